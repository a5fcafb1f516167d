"""Database work from async code, off the event loop and off Django's per-request threads.

`sync_to_async(thread_sensitive=True)` inside a request runs in a thread Django's ASGI
handler starts for that request, which opens a new database connection per request. The chat
path sends its ORM work here instead:

* `run_db(fn)`: reads (and rare writes) on a few long-lived threads, each keeping its
  connection (SQLite) or borrowing one from psycopg's pool (PostgreSQL).
* `write_db(fn)`: the writes of finished runs, group-committed. One writer thread takes every
  job queued while the previous commit ran and commits them together in one transaction,
  each job in its own savepoint (a failing job rolls back alone). A caller's await returns
  after its job is committed, so nothing is acknowledged before it is durable; under
  concurrency many runs share one commit instead of paying one each.

Stale or broken connections are dropped before and after each job, as Channels'
database_sync_to_async does.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable, TypeVar

from asgiref.sync import sync_to_async
from django.conf import settings
from django.db import close_old_connections, connection, connections, transaction

T = TypeVar("T")
logger = logging.getLogger("agentplatform.db")

_executor: ThreadPoolExecutor | None = None
_lock = threading.Lock()


def _pool() -> ThreadPoolExecutor:
    global _executor
    if _executor is None:
        with _lock:
            if _executor is None:
                _executor = ThreadPoolExecutor(max_workers=settings.DB_THREADS, thread_name_prefix="db")
    return _executor


def _job(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    close_old_connections()
    try:
        return fn(*args, **kwargs)
    finally:
        close_old_connections()


async def run_db(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Run sync ORM code `fn(*args, **kwargs)` on the database threads."""
    return await sync_to_async(_job, thread_sensitive=False, executor=_pool())(fn, *args, **kwargs)


class _GroupWriter:
    MAX_BATCH = 256

    def __init__(self) -> None:
        self.jobs: queue.SimpleQueue[tuple[Callable[[], Any], Future] | None] = queue.SimpleQueue()
        self.thread = threading.Thread(target=self._loop, name="db-writer", daemon=True)
        self.thread.start()

    def submit(self, fn: Callable[[], Any]) -> Future:
        future: Future = Future()
        self.jobs.put((fn, future))
        return future

    def _loop(self) -> None:
        while True:
            first = self.jobs.get()
            if first is None:
                connections.close_all()
                return
            batch = [first]
            while len(batch) < self.MAX_BATCH:
                try:
                    item = self.jobs.get_nowait()
                except queue.Empty:
                    break
                if item is None:
                    self.jobs.put(None)  # stop after this batch
                    break
                batch.append(item)
            self._commit(batch)

    @classmethod
    def _commit(cls, batch: list[tuple[Callable[[], Any], Future]]) -> None:
        close_old_connections()
        results: list[tuple[Future, Any, BaseException | None]] = []
        try:
            with transaction.atomic():
                if connection.vendor == "postgresql":
                    # Django's foreign keys are DEFERRABLE INITIALLY DEFERRED: checked at COMMIT,
                    # where one job's bad row (a session deleted meanwhile) would fail the whole
                    # batch. Checked at each statement instead, inside the job's savepoint.
                    with connection.cursor() as cursor:
                        cursor.execute("SET CONSTRAINTS ALL IMMEDIATE")
                for fn, future in batch:
                    try:
                        with transaction.atomic():  # a savepoint: one bad job rolls back alone
                            results.append((future, fn(), None))
                    except Exception as exc:
                        results.append((future, None, exc))
        except Exception as exc:  # the commit itself failed: no job of the batch is stored
            close_old_connections()
            if len(batch) > 1:
                # SQLite checks deferred foreign keys at COMMIT only: one bad job must not fail
                # the others, so each runs again in a transaction of its own.
                logger.warning("Group commit of %d jobs failed (%s); committing them one by one", len(batch), exc)
                for job in batch:
                    cls._commit([job])
                return
            logger.exception("Commit of a database write failed")
            for _, future in batch:
                future.set_exception(exc)
            return
        finally:
            close_old_connections()
        for future, value, error in results:
            if error is not None:
                future.set_exception(error)
            else:
                future.set_result(value)

    def stop(self) -> None:
        self.jobs.put(None)
        self.thread.join(timeout=10)


_writer: _GroupWriter | None = None


def _get_writer() -> _GroupWriter:
    global _writer
    if _writer is None or not _writer.thread.is_alive():
        with _lock:
            if _writer is None or not _writer.thread.is_alive():
                _writer = _GroupWriter()
    return _writer


async def write_db(fn: Callable[[], T]) -> T:
    """Run the sync write `fn()` in the next group commit; returns once it is committed."""
    return await asyncio.wrap_future(_get_writer().submit(fn))


def close_db_threads() -> None:
    """Stop the database threads and close their connections (tests, shutdown)."""
    global _executor, _writer
    with _lock:
        writer, _writer = _writer, None
        executor, _executor = _executor, None
    if writer is not None:
        writer.stop()
    if executor is not None:
        for _ in range(settings.DB_THREADS):
            executor.submit(connections.close_all)
        executor.shutdown(wait=True)

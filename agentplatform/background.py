"""One event loop per process for async work that is not a request: async runs and their
callbacks (agents.runs), whoever starts them.

The chat pipeline is async end to end (providers, the database threads, the cache), so a
Celery task, which is sync, runs it on this loop and waits for it; on the embedded default
(eager Celery) the same coroutine is handed to this loop without waiting, so a POST that queues
a run answers at once and the run proceeds here, as a worker would run it. One long-lived loop
rather than `asyncio.run()` per task: the provider clients (connection pools bound to a loop)
live as long as the process, and a thread pool of Celery workers shares one loop.

    background_submit(coro)    -> concurrent.futures.Future (never blocks)
    background_run(coro)       -> its result (blocks the calling thread; never call it on this loop)

The loop runs in a daemon thread started on first use, and again in a forked child (Celery's
prefork pool forks after import: a thread of the parent does not exist in the child).
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
from concurrent.futures import Future
from typing import Any, Coroutine, TypeVar

T = TypeVar("T")
logger = logging.getLogger("agentplatform.background")

_loop: asyncio.AbstractEventLoop | None = None
_pid: int | None = None
_lock = threading.Lock()


def background_loop() -> asyncio.AbstractEventLoop:
    global _loop, _pid
    with _lock:
        if _loop is None or _pid != os.getpid() or not _loop.is_running():
            loop = asyncio.new_event_loop()
            started = threading.Event()

            def serve() -> None:
                asyncio.set_event_loop(loop)
                loop.call_soon(started.set)
                loop.run_forever()

            threading.Thread(target=serve, name="background-loop", daemon=True).start()
            started.wait()
            _loop, _pid = loop, os.getpid()
    return _loop


def _log_failure(future: Future) -> None:
    if not future.cancelled() and future.exception() is not None:
        logger.error("Background job failed", exc_info=future.exception())


def background_submit(coro: Coroutine[Any, Any, T]) -> Future:
    """Schedule `coro` on the background loop; failures are logged."""
    future = asyncio.run_coroutine_threadsafe(coro, background_loop())
    future.add_done_callback(_log_failure)
    return future


def background_run(coro: Coroutine[Any, Any, T]) -> T:
    """Run `coro` on the background loop and return its result (for sync callers: tasks)."""
    loop = background_loop()
    try:
        running = asyncio.get_running_loop()
    except RuntimeError:
        running = None
    if running is not None:
        coro.close()
        raise RuntimeError("background_run() blocks: call it from sync code, not from an event loop")
    return asyncio.run_coroutine_threadsafe(coro, loop).result()

"""Request-boundary housekeeping without a thread per async request.

Django connects sync receivers to request_started/request_finished (close_old_connections,
reset_queries, close_caches, reset_urlconf). Under ASGI, `asend` runs sync receivers through
sync_to_async, which starts the request's own worker thread just to run them: for an async
view that never touched a sync thread that is a thread start and a useless connection check
per request. This replaces them with one async receiver that does the same work in the
request's sync thread when one was used (a sync view, the admin), and only the in-memory parts
otherwise. With a sync `send` (test client, WSGI) the receiver runs in the caller's thread,
exactly as before.
"""

from __future__ import annotations

from asgiref.sync import AsyncToSync, SyncToAsync, sync_to_async
from django.core import signals
from django.core.cache import close_caches
from django.core.handlers.base import reset_urlconf
from django.db import close_old_connections, reset_queries


def _sync_thread_in_use() -> bool:
    if getattr(AsyncToSync.executors, "current", None) is not None:
        return True  # a sync caller (test client, async_to_sync) waits in its own thread
    context = SyncToAsync.thread_sensitive_context.get(None)
    return context is not None and context in SyncToAsync.context_to_thread_executor


def _finish_sync() -> None:
    close_old_connections()
    close_caches()
    reset_urlconf(sender=None)


def _start_sync() -> None:
    reset_queries()
    close_old_connections()


async def request_started(sender, **kwargs) -> None:
    if _sync_thread_in_use():
        await sync_to_async(_start_sync)()


async def request_finished(sender, **kwargs) -> None:
    if _sync_thread_in_use():
        await sync_to_async(_finish_sync)()
    else:
        close_caches()
        reset_urlconf(sender=None)


def install_request_boundary() -> None:
    signals.request_started.disconnect(reset_queries)
    signals.request_started.disconnect(close_old_connections)
    signals.request_finished.disconnect(close_old_connections)
    signals.request_finished.disconnect(close_caches)
    signals.request_finished.disconnect(reset_urlconf)
    signals.request_started.connect(request_started, dispatch_uid="agentplatform.request_started")
    signals.request_finished.connect(request_finished, dispatch_uid="agentplatform.request_finished")

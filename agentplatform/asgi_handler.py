"""Django's ASGI handler without thread hops for requests that never touch a sync thread.

Django 5.2's ASGIHandler runs the sync receivers of request_started / request_finished
(close_old_connections, reset_queries, close_caches, reset_urlconf) and response.close()
through sync_to_async: every request, async views included, starts its own worker thread for
them. Here, when the request never used a sync thread (our async chat views), the receivers
that only concern such a thread's database connection are skipped (that thread does not exist,
so it has no connection), the in-memory ones run inline and any other receiver runs as Django
would. Requests that did use a thread (the admin, DRF's sync views) get Django's behaviour.
The rest is Django's code, unchanged; the test client does not use this handler.
"""

from __future__ import annotations

import asyncio

from asgiref.sync import AsyncToSync, SyncToAsync, sync_to_async
from django.core import signals
from django.core.cache import close_caches
from django.core.handlers.base import reset_urlconf
from django.db import close_old_connections, reset_queries
from django.core.handlers.asgi import ASGIHandler, get_script_prefix
from django.core.exceptions import RequestAborted
from django.urls import set_script_prefix


# Receivers that act on the current thread's connections only.
_THREAD_ONLY = {close_old_connections, reset_queries}
# Receivers that are cheap and in-memory: safe to run on the event loop.
_INLINE = {close_caches, reset_urlconf}


def _sync_thread_in_use() -> bool:
    if getattr(AsyncToSync.executors, "current", None) is not None:
        return True
    context = SyncToAsync.thread_sensitive_context.get(None)
    return context is not None and context in SyncToAsync.context_to_thread_executor


async def send_boundary(signal, sender, **kwargs) -> None:
    """signal.asend(sender, **kwargs), without a thread hop when no sync thread was used."""
    if _sync_thread_in_use():
        await signal.asend(sender=sender, **kwargs)
        return
    sync_receivers, async_receivers = signal._live_receivers(sender)
    others = []
    for receiver in sync_receivers:
        if receiver in _INLINE:
            receiver(signal=signal, sender=sender, **kwargs)
        elif receiver not in _THREAD_ONLY:
            others.append(receiver)
    if others:
        def run_others() -> None:
            for receiver in others:
                receiver(signal=signal, sender=sender, **kwargs)

        await sync_to_async(run_others)()
    if async_receivers:
        await asyncio.gather(*(r(signal=signal, sender=sender, **kwargs) for r in async_receivers))


async def close_response(response) -> None:
    if _sync_thread_in_use():
        await sync_to_async(response.close)()
        return
    for closer in response._resource_closers:
        try:
            closer()
        except Exception:
            pass
    response._resource_closers.clear()
    response.closed = True
    await send_boundary(signals.request_finished, response._handler_class)


class PlatformASGIHandler(ASGIHandler):
    async def handle(self, scope, receive, send):
        try:
            body_file = await self.read_body(receive)
        except RequestAborted:
            return
        set_script_prefix(get_script_prefix(scope))
        await send_boundary(signals.request_started, self.__class__, scope=scope)
        request, error_response = self.create_request(scope, body_file)
        if request is None:
            body_file.close()
            await self.send_response(error_response, send)
            await close_response(error_response)
            return

        async def process_request(request, send):
            response = await self.run_get_response(request)
            try:
                await self.send_response(response, send)
            except asyncio.CancelledError:
                pass
            return response

        tasks = [
            asyncio.create_task(self.listen_for_disconnect(receive)),
            asyncio.create_task(process_request(request, send)),
        ]
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        for task in tasks:
            if task.done():
                try:
                    task.result()
                except RequestAborted:
                    pass
                except AssertionError:
                    body_file.close()
                    raise
            else:
                task.cancel()
                try:
                    await task
                except asyncio.CancelledError:
                    pass

        try:
            response = tasks[1].result()
        except asyncio.CancelledError:
            await send_boundary(signals.request_finished, self.__class__)
        else:
            await close_response(response)

        body_file.close()

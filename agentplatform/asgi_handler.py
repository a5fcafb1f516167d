"""Django's ASGI handler without the thread hop at the end of every request.

Django 5.2's ASGIHandler.handle ends each request with `await sync_to_async(response.close)()`:
response.close() sends request_finished synchronously, so every request, async views
included, starts the request's worker thread just to close the response. Here the response's
resource closers run inline (closing in-memory bodies and already-read files) and
request_finished is sent with `asend`, whose receivers are async (agentplatform.signals).
Everything else is Django's code, unchanged.
"""

from __future__ import annotations

import asyncio

from django.core import signals
from django.core.handlers.asgi import ASGIHandler, get_script_prefix
from django.core.exceptions import RequestAborted
from django.urls import set_script_prefix


async def close_response(response) -> None:
    for closer in response._resource_closers:
        try:
            closer()
        except Exception:
            pass
    response._resource_closers.clear()
    response.closed = True
    await signals.request_finished.asend(sender=response._handler_class)


class PlatformASGIHandler(ASGIHandler):
    async def handle(self, scope, receive, send):
        try:
            body_file = await self.read_body(receive)
        except RequestAborted:
            return
        set_script_prefix(get_script_prefix(scope))
        await signals.request_started.asend(sender=self.__class__, scope=scope)
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
            await signals.request_finished.asend(sender=self.__class__)
        else:
            await close_response(response)

        body_file.close()

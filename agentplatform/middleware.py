"""Middleware that keeps the API path free of thread hops, plus the request id and body limit.

Under ASGI, Django's MiddlewareMixin runs every process_* hook through
sync_to_async(thread_sensitive=True), i.e. a thread hop per hook per request. The
subclasses here keep the Django classes (so the admin's system checks still see them) but:
  * InlineHooksMixin: hooks that do no I/O (security headers, common, x-frame, CSRF's
    token check, Prometheus counters) run inline on the event loop;
  * PagesOnlyMixin: session, auth and messages (which may touch the database) run as
    Django runs them, but only for pages; API paths (settings.API_PATH_PREFIXES) authenticate
    by API key and skip them entirely. So does django-csp's Content-Security-Policy (pages only,
    inline).
Django's deploy checks find its middleware by dotted path: agentplatform.checks runs them on
these subclasses.
"""

from __future__ import annotations

import logging
import re
import time
import types
import uuid
from typing import Any, Callable

from asgiref.sync import iscoroutinefunction, markcoroutinefunction
from csp import middleware as csp_middleware
from django.conf import settings
from django.contrib.auth import middleware as auth_middleware
from django.contrib.messages import middleware as messages_middleware
from django.contrib.sessions import middleware as sessions_middleware
from django.middleware import clickjacking, common, csrf, security
from django.utils.deprecation import MiddlewareMixin
from django_prometheus import middleware as prometheus_middleware

from .csp import SAME_HOST_WEBSOCKETS, same_host_websockets
from .logs import request_id_var
from .methods import answer_methods, view_methods

logger = logging.getLogger("agentplatform.errors")
access_logger = logging.getLogger("agentplatform.access")
_REQUEST_ID_RE = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


def is_api_path(path: str) -> bool:
    return path.startswith(settings.API_PATH_PREFIXES) and not path.startswith(settings.API_PATHS_WITH_SESSION)


def _inline_async(hook: Callable) -> Callable:
    async def run(self: Any, *args: Any) -> Any:
        return hook(*args)

    return run


class InlineHooksMixin:
    """Run this middleware's hooks inline in async mode: they must not do blocking I/O."""

    def __init__(self, get_response: Callable) -> None:
        super().__init__(get_response)  # type: ignore[call-arg]
        if self.async_mode:  # type: ignore[attr-defined]
            for name in ("process_view", "process_exception", "process_template_response"):
                hook = getattr(self, name, None)
                if hook is not None:
                    # A bound method: Django names the middleware by hook.__self__ in errors.
                    setattr(self, name, types.MethodType(_inline_async(hook), self))

    async def __acall__(self, request: Any) -> Any:
        response = None
        if hasattr(self, "process_request"):
            response = self.process_request(request)
        response = response or await self.get_response(request)  # type: ignore[attr-defined]
        if hasattr(self, "process_response"):
            response = self.process_response(request, response)
        return response


class PagesOnlyMixin:
    """Skip this middleware for API paths; run it as Django does for pages."""

    async def __acall__(self, request: Any) -> Any:
        if is_api_path(request.path):
            return await self.get_response(request)  # type: ignore[attr-defined]
        return await super().__acall__(request)  # type: ignore[misc]


class PrometheusBeforeMiddleware(InlineHooksMixin, prometheus_middleware.PrometheusBeforeMiddleware):
    pass


class PrometheusAfterMiddleware(InlineHooksMixin, prometheus_middleware.PrometheusAfterMiddleware):
    pass


class SecurityMiddleware(InlineHooksMixin, security.SecurityMiddleware):
    pass


class CommonMiddleware(InlineHooksMixin, common.CommonMiddleware):
    pass


class CsrfViewMiddleware(InlineHooksMixin, csrf.CsrfViewMiddleware):
    pass


class XFrameOptionsMiddleware(InlineHooksMixin, clickjacking.XFrameOptionsMiddleware):
    pass


class HttpMethodsMiddleware(InlineHooksMixin, MiddlewareMixin):
    """OPTIONS → 204 with Allow; a method the resolved view does not answer → 405 JSON with
    Allow (agentplatform.methods). A view hook: it runs once the URL is resolved, before CSRF
    (list it above CsrfViewMiddleware) and before the view authenticates. CORS preflights are
    answered earlier still, by corsheaders' middleware."""

    def process_view(self, request: Any, view_func: Callable, view_args: Any, view_kwargs: Any) -> Any:
        return answer_methods(request, view_methods(view_func))


class SessionMiddleware(PagesOnlyMixin, sessions_middleware.SessionMiddleware):
    pass


class ContentSecurityPolicyMiddleware(PagesOnlyMixin, InlineHooksMixin, csp_middleware.CSPMiddleware):
    """django-csp's middleware: writes the policy a page's decorator set (agentplatform.csp), with
    the request's own ws:/wss: origins in place of SAME_HOST_WEBSOCKETS. Pages only (API answers
    are JSON, never rendered); its hooks do no I/O, so they run inline."""

    def get_policy_parts(self, request: Any, response: Any, report_only: bool = False) -> Any:
        parts = super().get_policy_parts(request, response, report_only)
        if parts.config and SAME_HOST_WEBSOCKETS in parts.config.get("connect-src", ()):
            sources = [s for s in parts.config["connect-src"] if s != SAME_HOST_WEBSOCKETS]
            parts.config = {**parts.config, "connect-src": sources + same_host_websockets(request.get_host())}
        return parts


class AuthenticationMiddleware(PagesOnlyMixin, auth_middleware.AuthenticationMiddleware):
    pass


class MessageMiddleware(PagesOnlyMixin, messages_middleware.MessageMiddleware):
    pass


class _BothModes:
    """A middleware that runs sync or async, as the chain it sits in (`async_mode`)."""

    sync_capable = True
    async_capable = True

    def __init__(self, get_response: Callable) -> None:
        self.get_response = get_response
        self.async_mode = iscoroutinefunction(get_response)
        if self.async_mode:
            markcoroutinefunction(self)


class ApiErrorMiddleware(_BothModes):
    """API paths answer an unexpected error with the JSON error shape, also with DEBUG on
    (Django would render its HTML debug page). The error is logged with its traceback."""

    def __call__(self, request: Any) -> Any:
        return self.get_response(request)

    def process_exception(self, request: Any, exception: Exception) -> Any:
        if not is_api_path(request.path):
            return None
        from .errors import error_response, internal_error, platform_error_from

        err = platform_error_from(exception)
        if err is None:
            logger.error("Unhandled error on %s %s", request.method, request.path, exc_info=exception)
            err = internal_error()
        return error_response(err, request)


class RequestIdMiddleware(_BothModes):
    """Give each request an id (the caller's X-Request-ID when well-formed) and echo it back;
    every log record written while serving it carries it (agentplatform.logs). Writes the
    request's access line (`agentplatform.access`: method, path, status, latency; INFO, the
    health probes DEBUG) when the response starts."""

    @staticmethod
    def _assign(request: Any) -> str:
        supplied = request.headers.get("X-Request-ID", "")
        request_id = supplied if _REQUEST_ID_RE.match(supplied) else f"req_{uuid.uuid4().hex}"
        request.request_id = request_id
        request_id_var.set(request_id)
        return request_id

    def __call__(self, request: Any) -> Any:
        if self.async_mode:
            return self.__acall__(request)
        started = time.perf_counter()
        request_id = self._assign(request)
        response = self.get_response(request)
        response["X-Request-ID"] = request_id
        _access_log(request, response, started)
        return response

    async def __acall__(self, request: Any) -> Any:
        started = time.perf_counter()
        request_id = self._assign(request)
        response = await self.get_response(request)
        response["X-Request-ID"] = request_id
        _access_log(request, response, started)
        return response


def _access_log(request: Any, response: Any, started: float) -> None:
    level = logging.DEBUG if request.path.startswith(("/health", "/static/")) else logging.INFO
    if not access_logger.isEnabledFor(level):
        return
    latency_ms = round((time.perf_counter() - started) * 1000, 1)
    # The path only: a query string may hold what a caller typed (it is masked all the same).
    access_logger.log(level, "%s %s %s %.1f ms", request.method, request.path, response.status_code, latency_ms,
                      extra={"method": request.method, "path": request.path, "status": response.status_code,
                             "latency_ms": latency_ms, "streaming": bool(getattr(response, "streaming", False))})


class UrlTextMiddleware(_BothModes):
    """A path or query string holding a NUL character (`%00`) gets 400 before any view reads it:
    no field accepts one, and PostgreSQL cannot even compare it (psycopg refuses the query, a
    500 after a view passed it to a filter). JSON bodies are checked by agentplatform.jsonparse."""

    @staticmethod
    def _refusal(request: Any) -> Any:
        query = request.META.get("QUERY_STRING", "")
        if "\x00" not in request.path and "%00" not in query and "\x00" not in query:
            return None
        from .errors import InvalidRequest, error_response

        return error_response(InvalidRequest("The URL holds a NUL character (%00), which no parameter accepts.",
                                             code="invalid_url"), request)

    def __call__(self, request: Any) -> Any:
        if self.async_mode:
            return self.__acall__(request)
        return self._refusal(request) or self.get_response(request)

    async def __acall__(self, request: Any) -> Any:
        return self._refusal(request) or await self.get_response(request)


class BodySizeLimitASGI:
    """ASGI wrapper: refuse bodies over MAX_REQUEST_BYTES with 413 before Django reads them.

    Django's ASGI handler spools the whole body before any view runs; checking here means an
    oversized upload costs us its first chunk, not its full size.
    """

    def __init__(self, app: Callable, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        request_id = None
        length = None
        for name, value in scope.get("headers", ()):
            if name == b"content-length":
                length = value
            elif name == b"x-request-id":
                supplied = value.decode("latin-1")
                request_id = supplied if _REQUEST_ID_RE.match(supplied) else None
        request_id = request_id or f"req_{uuid.uuid4().hex}"
        if length is not None:
            try:
                too_big = int(length) > self.max_bytes
            except ValueError:
                return await self._reply(send, 400, "invalid_request", "Malformed Content-Length header.", request_id)
            if too_big:
                return await self._reply(send, 413, "request_too_large", self._message(), request_id)
        received = 0
        limit = self.max_bytes
        over = False

        async def limited_receive() -> dict:
            nonlocal received, over
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    over = True
                    raise _BodyTooLarge()
            return message

        try:
            await self.app(scope, limited_receive, send)
        except _BodyTooLarge:
            await self._reply(send, 413, "request_too_large", self._message(), request_id)

    def _message(self) -> str:
        return f"The request body is larger than the limit of {self.max_bytes} bytes."

    @staticmethod
    async def _reply(send: Callable, status: int, code: str, message: str, request_id: str) -> None:
        import json

        body = json.dumps(
            {"error": {"type": "invalid_request_error", "code": code, "message": message, "request_id": request_id}}
        ).encode()
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                (b"x-request-id", request_id.encode())]})
        await send({"type": "http.response.body", "body": body})


class _BodyTooLarge(Exception):
    pass

"""Async API views that drf-spectacular still documents.

DRF's APIView dispatch is sync: under ASGI it runs in a worker thread and every database or
cache call funnels through Django's one sync thread. The chat path must not, so these views
keep APIView as their class (drf-spectacular reads serializers and @extend_schema from it)
but replace `as_view` with an async view: authentication, JSON parsing, validation and error
rendering happen on the event loop, with the same JSON error shape as everywhere else.
"""

from __future__ import annotations

import logging
from typing import Any

from asgiref.sync import markcoroutinefunction
from django.conf import settings
from django.http import HttpRequest, HttpResponse
from django.views.decorators.csrf import csrf_exempt
from rest_framework.views import APIView

from .errors import (
    AuthenticationFailed,
    InvalidRequest,
    UnsupportedMediaType,
    error_response,
    internal_error,
    platform_error_from,
)
from .jsonparse import loads_strict
from .methods import answer_methods, view_methods

logger = logging.getLogger("agentplatform.views")


def parse_json_body(request: HttpRequest) -> dict:
    """The request body as a JSON object; 415/400 errors that name the problem otherwise."""
    content_type = request.content_type or ""
    if content_type not in ("application/json", "") and not content_type.endswith("+json"):
        raise UnsupportedMediaType(f"Send the body as application/json, not {content_type}.")
    data = loads_strict(request.body or b"null")
    if not isinstance(data, dict):
        raise InvalidRequest("The JSON body must be an object.", code="invalid_json")
    return data


def client_ip(request: HttpRequest) -> str | None:
    """The caller's address: REMOTE_ADDR, or the first X-Forwarded-For hop behind a trusted proxy."""
    if settings.TRUST_X_FORWARDED_FOR:
        forwarded = request.headers.get("X-Forwarded-For", "")
        first = forwarded.split(",")[0].strip()
        if first:
            return first[:45]
    return request.META.get("REMOTE_ADDR") or None


def with_headers(response: HttpResponse, headers: dict[str, str]) -> HttpResponse:
    for name, value in headers.items():
        response[name] = value
    return response


def require_principal(principal: Any) -> Any:
    if principal is None:
        raise AuthenticationFailed()
    return principal


class AsyncAPIView(APIView):
    """Subclasses define `async def post(self, request, **kwargs)` etc. returning a response."""

    @classmethod
    def as_view(cls, **initkwargs):  # type: ignore[override]
        async def view(request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponse:
            self = cls(**initkwargs)
            self.request, self.args, self.kwargs = request, args, kwargs
            try:
                # HttpMethodsMiddleware answers these first; here for callers without it.
                refused = answer_methods(request, view_methods(view))
                if refused is not None:
                    return refused
                name = "get" if request.method == "HEAD" and not hasattr(self, "head") else request.method.lower()
                return await getattr(self, name)(request, *args, **kwargs)
            except Exception as exc:  # one JSON error shape, never a traceback
                err = platform_error_from(exc)
                if err is None:
                    logger.exception("Unhandled error in %s", cls.__name__)
                    err = internal_error()
                return error_response(err, request)

        view.cls = cls  # type: ignore[attr-defined]
        view.initkwargs = initkwargs  # type: ignore[attr-defined]
        markcoroutinefunction(view)
        # API keys, never cookies, authenticate these views: CSRF does not apply.
        return csrf_exempt(view)

"""One error hierarchy and one JSON shape for every transport.

Services raise PlatformError subclasses and never build responses. The renderers here turn
ours, DRF's and Django's exceptions into
    {"error": {"type", "code", "message", "request_id", "param"?, "details"?}}
which is OpenAI's error shape plus our request id, so OpenAI SDKs read it as they read OpenAI's.
"""

from __future__ import annotations

import logging
from typing import Any

from django.core.exceptions import PermissionDenied as DjangoPermissionDenied
from django.core.exceptions import RequestDataTooBig
from django.http import Http404, HttpRequest, JsonResponse
from rest_framework import exceptions as drf_exceptions

logger = logging.getLogger("agentplatform.errors")


class PlatformError(Exception):
    http_status: int = 500
    code: str = "internal_error"
    type: str = "server_error"
    message: str = "The server could not complete the request."
    # A permanent error will fail the same way when retried; transient ones may succeed later.
    permanent: bool = True

    def __init__(
        self,
        message: str | None = None,
        *,
        code: str | None = None,
        param: str | None = None,
        details: Any = None,
        headers: dict[str, str] | None = None,
        http_status: int | None = None,
    ) -> None:
        self.message = message or self.message
        self.code = code or self.code
        self.param = param
        self.details = details
        self.headers = headers or {}
        if http_status is not None:
            self.http_status = http_status
        super().__init__(self.message)

    def as_dict(self, request_id: str | None = None) -> dict[str, Any]:
        body: dict[str, Any] = {"type": self.type, "code": self.code, "message": self.message, "request_id": request_id}
        if self.param is not None:
            body["param"] = self.param
        if self.details is not None:
            body["details"] = self.details
        return body


class InvalidRequest(PlatformError):
    http_status = 400
    code = "invalid_request"
    type = "invalid_request_error"
    message = "The request is not valid."


class AuthenticationFailed(PlatformError):
    http_status = 401
    code = "invalid_api_key"
    type = "authentication_error"
    message = "A valid API key is required: send `Authorization: Bearer <key>` or `X-API-Key: <key>`."


class PermissionDenied(PlatformError):
    http_status = 403
    code = "permission_denied"
    type = "permission_error"
    message = "This API key may not do that."


class NotFound(PlatformError):
    http_status = 404
    code = "not_found"
    type = "not_found_error"
    message = "Not found."


class MethodNotAllowed(PlatformError):
    http_status = 405
    code = "method_not_allowed"
    type = "invalid_request_error"
    message = "Method not allowed."


class Conflict(PlatformError):
    http_status = 409
    code = "conflict"
    type = "invalid_request_error"
    message = "The request conflicts with the current state."


class PayloadTooLarge(PlatformError):
    http_status = 413
    code = "request_too_large"
    type = "invalid_request_error"
    message = "The request body is too large."


class UnsupportedMediaType(PlatformError):
    http_status = 415
    code = "unsupported_media_type"
    type = "invalid_request_error"
    message = "Send the body as application/json."


class UpstreamError(PlatformError):
    """The model provider failed; `permanent` says whether retrying or falling back can help."""

    http_status = 502
    code = "upstream_error"
    type = "api_error"
    message = "The model provider failed to answer."
    permanent = False

    def __init__(self, message: str | None = None, *, permanent: bool = False, retry_after: float | None = None,
                 upstream_status: int | None = None, **kwargs: Any) -> None:
        super().__init__(message, **kwargs)
        self.permanent = permanent
        self.retry_after = retry_after
        self.upstream_status = upstream_status


class UpstreamTimeout(UpstreamError):
    http_status = 504
    code = "upstream_timeout"
    message = "The model provider did not answer in time."


class ServiceUnavailable(PlatformError):
    http_status = 503
    code = "service_unavailable"
    type = "server_error"
    message = "The service is temporarily unavailable."
    permanent = False


def request_id_of(request: Any) -> str | None:
    return getattr(request, "request_id", None) or getattr(getattr(request, "_request", None), "request_id", None)


def error_response(exc: PlatformError, request: HttpRequest | None = None) -> JsonResponse:
    response = JsonResponse({"error": exc.as_dict(request_id_of(request))}, status=exc.http_status)
    for name, value in exc.headers.items():
        response[name] = value
    return response


def internal_error() -> PlatformError:
    return PlatformError()


def _first_error(detail: Any, path: str = "") -> tuple[str, str]:
    """The first (field path, message) of a DRF ValidationError detail tree."""
    if isinstance(detail, dict):
        for key, value in detail.items():
            if isinstance(key, int):  # DRF reports list items as {index: errors}
                return _first_error(value, f"{path}[{key}]")
            sub = str(key) if key != "non_field_errors" else ""
            return _first_error(value, f"{path}.{sub}" if path and sub else (sub or path))
    if isinstance(detail, list) and detail:
        if all(not isinstance(d, (dict, list)) for d in detail):
            return path, str(detail[0])
        for index, value in enumerate(detail):
            if value:
                return _first_error(value, f"{path}[{index}]" if path else f"[{index}]")
    return path, str(detail)


def platform_error_from(exc: BaseException) -> PlatformError | None:
    """Map ours, DRF's and Django's exceptions to a PlatformError; None for unexpected ones."""
    if isinstance(exc, PlatformError):
        return exc
    if isinstance(exc, drf_exceptions.ValidationError):
        param, message = _first_error(exc.detail)
        text = f"{param}: {message}" if param else message
        return InvalidRequest(text, code="invalid_field" if param else "invalid_request", param=param or None,
                              details=exc.detail)
    if isinstance(exc, drf_exceptions.ParseError):
        return InvalidRequest(f"Malformed JSON body: {exc.detail}", code="invalid_json")
    if isinstance(exc, (drf_exceptions.NotAuthenticated, drf_exceptions.AuthenticationFailed)):
        return AuthenticationFailed(str(exc.detail) if isinstance(exc, drf_exceptions.AuthenticationFailed) else None)
    if isinstance(exc, (drf_exceptions.PermissionDenied, DjangoPermissionDenied)):
        return PermissionDenied()
    if isinstance(exc, (drf_exceptions.NotFound, Http404)):
        return NotFound()
    if isinstance(exc, drf_exceptions.MethodNotAllowed):
        return MethodNotAllowed(str(exc.detail))
    if isinstance(exc, drf_exceptions.UnsupportedMediaType):
        return UnsupportedMediaType(str(exc.detail))
    if isinstance(exc, RequestDataTooBig):
        return PayloadTooLarge()
    if isinstance(exc, drf_exceptions.Throttled):
        return PlatformError(str(exc.detail), code="rate_limited", http_status=429)
    if isinstance(exc, drf_exceptions.APIException):
        err = PlatformError(str(exc.detail), code=str(exc.default_code), http_status=exc.status_code)
        err.type = "invalid_request_error" if exc.status_code < 500 else "server_error"
        return err
    return None


def drf_exception_handler(exc: Exception, context: dict) -> JsonResponse:
    request = context.get("request")
    err = platform_error_from(exc)
    if err is None:
        logger.exception("Unhandled error in %s", context.get("view").__class__.__name__)
        err = internal_error()
    response = error_response(err, request)
    # DRF's own WWW-Authenticate/Retry-After conventions: keep the header where DRF set one.
    if isinstance(exc, drf_exceptions.APIException) and getattr(exc, "wait", None):
        response["Retry-After"] = str(int(exc.wait))
    return response


# Django-level handlers (urls.py): JSON for the API and for pages alike, never an HTML traceback.
def handler400(request: HttpRequest, exception: Exception | None = None) -> JsonResponse:
    if isinstance(exception, RequestDataTooBig):
        return error_response(PayloadTooLarge(), request)
    return error_response(InvalidRequest("Bad request."), request)


def handler403(request: HttpRequest, exception: Exception | None = None) -> JsonResponse:
    return error_response(PermissionDenied("Forbidden."), request)


def handler404(request: HttpRequest, exception: Exception | None = None) -> JsonResponse:
    return error_response(NotFound(f"No route for {request.method} {request.path}.", code="route_not_found"), request)


def handler500(request: HttpRequest) -> JsonResponse:
    return error_response(internal_error(), request)

"""Which HTTP methods each of our views answers, in one place.

HttpMethodsMiddleware (agentplatform.middleware) asks `view_methods` for the resolved view
before authentication, CSRF or the view run: OPTIONS gets 204 with `Allow`, any other method
the view does not answer (TRACE, FOO, PROPFIND, POST on /health) a 405 in the JSON error shape
with `Allow`. Class-based views (DRF's, our AsyncAPIView, Django's) say it by the handlers they
define; function views declare it with @http_methods. Views that say nothing (the Django admin)
are left to themselves.
"""

from __future__ import annotations

from typing import Any, Callable

from django.http import HttpRequest, HttpResponse

from .errors import MethodNotAllowed, error_response

# The order of the Allow header.
_ORDER = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")
_cache: dict[Callable, frozenset[str] | None] = {}


def _complete(methods: set[str]) -> frozenset[str]:
    if "GET" in methods:
        methods.add("HEAD")  # Django answers HEAD with the GET handler
    methods.add("OPTIONS")
    return frozenset(methods)


def http_methods(*methods: str) -> Callable[[Callable], Callable]:
    """Declare the methods a function view answers (HEAD comes with GET, OPTIONS with all).
    Django's decorators (login, admin_view, csrf_exempt) keep the declaration: they copy the
    wrapped function's attributes."""
    declared = _complete({m.upper() for m in methods})

    def decorate(view: Callable) -> Callable:
        view.http_methods = declared  # type: ignore[attr-defined]
        return view

    return decorate


def view_methods(view: Callable) -> frozenset[str] | None:
    """The methods `view` answers, or None when it does not say."""
    try:
        return _cache[view]
    except (KeyError, TypeError):
        pass
    methods: frozenset[str] | None = getattr(view, "http_methods", None)
    cls: Any = getattr(view, "cls", None) or getattr(view, "view_class", None)
    if methods is None and cls is not None:
        methods = _complete({m.upper() for m in cls.http_method_names if m != "options" and hasattr(cls, m)})
    try:
        _cache[view] = methods
    except TypeError:
        pass
    return methods


def allow_header(methods: frozenset[str]) -> str:
    return ", ".join(m for m in _ORDER if m in methods)


def options_response(methods: frozenset[str]) -> HttpResponse:
    response = HttpResponse(status=204, headers={"Allow": allow_header(methods)})
    del response["Content-Type"]  # no content
    return response


def method_not_allowed(request: HttpRequest, methods: frozenset[str]) -> HttpResponse:
    allow = allow_header(methods)
    return error_response(MethodNotAllowed(f"Method {request.method[:20]} is not allowed here; allowed: {allow}.",
                                           headers={"Allow": allow}), request)


def answer_methods(request: HttpRequest, methods: frozenset[str] | None) -> HttpResponse | None:
    """The response for OPTIONS or a method the view does not answer; None to go on."""
    if methods is None:
        return None
    if request.method == "OPTIONS":
        return options_response(methods)
    if request.method not in methods:
        return method_not_allowed(request, methods)
    return None

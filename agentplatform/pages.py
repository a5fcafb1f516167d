"""The site root for people (links to the admin, the console, the API docs, health) and /favicon.ico."""

from __future__ import annotations

from functools import lru_cache

from django.conf import settings
from django.http import HttpRequest, HttpResponse
from django.shortcuts import render

from .methods import http_methods

FAVICON = settings.BASE_DIR / "static" / "agentplatform" / "favicon.svg"


@http_methods("GET")
def home(request: HttpRequest) -> HttpResponse:
    return render(request, "home.html")


@lru_cache(maxsize=1)
def _favicon() -> bytes:
    return FAVICON.read_bytes()


@http_methods("GET")
def favicon(request: HttpRequest) -> HttpResponse:
    # Browsers ask for /favicon.ico whatever the page says; an SVG answers it (served here, so
    # also when SERVE_STATIC is off and /static/ lives on a CDN).
    response = HttpResponse(_favicon(), content_type="image/svg+xml")
    response["Cache-Control"] = "public, max-age=86400"
    return response

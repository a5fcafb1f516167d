"""Idempotency-Key handling for POSTs that create work (filled in by the idempotency work)."""

from typing import Awaitable, Callable

from django.http import HttpRequest, HttpResponse


async def idempotent(request: HttpRequest, principal, produce: Callable[[], Awaitable[HttpResponse]]) -> HttpResponse:
    """Return produce()'s response, or the stored one for a retry with the same Idempotency-Key."""
    return await produce()

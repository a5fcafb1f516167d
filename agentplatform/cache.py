"""Async reads of the shared cache for the hot path.

Django's cache API is sync; its a* methods hop to a thread per key. The chat path reads the
API key and the agent in one round trip here instead: with django-redis as the cache it
issues one MGET through redis.asyncio against the same keys and serialization (so entries
written by the sync API, e.g. on a cache miss or an invalidation, are the same entries); with
the local-memory cache (embedded default) the read is in-process and needs no thread.
Writes stay on the sync API; they happen on misses and saves, not per request.
"""

from __future__ import annotations

import asyncio
from typing import Any

from asgiref.sync import sync_to_async
from django.conf import settings
from django.core.cache import caches
from django.core.cache.backends.locmem import LocMemCache
from django.core.signals import setting_changed
from django.dispatch import receiver

_redis_clients: dict[int, Any] = {}


def _async_redis(url: str):
    import redis.asyncio as aredis

    loop_id = id(asyncio.get_running_loop())
    client = _redis_clients.get(loop_id)
    if client is None:
        client = aredis.from_url(url, socket_connect_timeout=2, socket_timeout=2)
        _redis_clients.clear()  # one loop per server process; forget clients of finished loops
        _redis_clients[loop_id] = client
    return client


def redis_url() -> str:
    """The Redis that state shared by all workers lives in (rate limits, circuit breakers):
    REDIS_URL, else the django-redis cache's server; "" when there is none (the embedded
    default keeps such state in the process)."""
    if settings.REDIS_URL:
        return settings.REDIS_URL
    backend = caches["default"]
    if type(backend).__module__.startswith("django_redis"):
        server = backend._server  # type: ignore[attr-defined]
        return server[0] if isinstance(server, (list, tuple)) else server
    return ""


async def cache_get_many(keys: list[str]) -> dict[str, Any]:
    """Like cache.get_many, without blocking the event loop and in one round trip."""
    backend = caches["default"]
    if isinstance(backend, LocMemCache):
        return backend.get_many(keys)
    if type(backend).__module__.startswith("django_redis"):
        client = backend.client  # type: ignore[attr-defined]
        url = backend._server[0] if isinstance(backend._server, (list, tuple)) else backend._server  # type: ignore[attr-defined]
        made = [str(client.make_key(k)) for k in keys]
        raw = await _async_redis(url).mget(made)
        return {k: client.decode(v) for k, v in zip(keys, raw) if v is not None}
    return await sync_to_async(backend.get_many)(keys)


@receiver(setting_changed)
def _reset(*, setting: str, **kwargs) -> None:
    if setting == "CACHES":
        _redis_clients.clear()

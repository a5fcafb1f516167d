"""The shared cache and Redis: one client per event loop, one outage detector, async reads.

Async reads for the hot path. Django's cache API is sync; its a* methods hop to a thread per
key. The chat path reads the API key and the agent in one round trip here instead: with
django-redis as the cache it issues one MGET through redis.asyncio against the same keys and
serialization (so entries written by the sync API, e.g. on a cache miss or an invalidation, are
the same entries); with the local-memory cache (embedded default) the read is in-process and
needs no thread. Writes stay on the sync API; they happen on misses and saves, not per request.

Redis outages degrade, they do not break. Everything that talks to Redis — this module's reads,
the django-redis cache (`ResilientRedisCache`), the rate limiter, the circuit breakers, the
channel layer (agentplatform.channels) and Celery enqueues (agentplatform.celery.enqueue) — asks
the one `redis_outage(url)` of its server and tells it about failures. After a failure Redis
is considered down in this process for REDIS_RETRY_SECONDS: callers skip it at once (no
connect attempt, no timeout: an outage costs a request nothing), then the next call tries
again, and a success ends the outage (logged once each way, counted in
`redis_unavailable_total{component}`). What each caller does meanwhile:
  * cache reads miss, so authentication and agent resolution read the database (the source of
    truth); cache writes are skipped; invalidations (deletes) that could not reach Redis are kept
    and sent before this process' next cache read once it answers, so a key revoked during the
    outage is not let in by its stale entry (other workers may read that entry until the
    revoking worker's next request; a process that dies meanwhile takes its list along: those
    entries expire after AGENT_CACHE_SECONDS);
  * rate limits fail open or closed (RATE_LIMIT_FAIL_MODE), circuit breakers use the process'
    own state, the channel layer stops delivering cross-worker messages (a WebSocket turn on
    its own worker streams on), Celery enqueues are skipped (the beat's backstops enqueue them
    again: runs_requeue_lost, the alert scan);
  * /health/ready answers 503 naming what is down; idempotency and budgets live in the
    database and keep their guarantees.
Connect and read timeouts are REDIS_TIMEOUT_SECONDS (short: an unreachable host stalls at most
one request per retry interval per process).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from typing import Any
from urllib.parse import urlsplit

from asgiref.sync import sync_to_async
from django.conf import settings
from django.core.cache import caches
from django.core.cache.backends.locmem import LocMemCache
from django.core.signals import setting_changed
from django.dispatch import receiver

from .metrics import redis_unavailable

logger = logging.getLogger("agentplatform.redis")

REDIS_ERRORS: tuple[type[BaseException], ...] = (OSError, asyncio.TimeoutError)
try:
    from redis.exceptions import RedisError

    REDIS_ERRORS += (RedisError,)
except ImportError:  # pragma: no cover - redis is a dependency
    pass
try:
    from django_redis.cache import RedisCache
    from django_redis.client import DefaultClient
    from django_redis.exceptions import ConnectionInterrupted

    REDIS_ERRORS += (ConnectionInterrupted,)
except ImportError:  # pragma: no cover - django-redis is a dependency
    RedisCache = DefaultClient = None  # type: ignore[assignment,misc]


def _where(url: str) -> str:
    """host:port/db of a Redis URL, never its password."""
    parts = urlsplit(url)
    return f"{parts.hostname or '?'}:{parts.port or 6379}{parts.path or ''}"


class RedisOutage:
    """This process' view of one Redis server: up, or down since a failure (until the next try).

    Thread-safe (the cache is used from database threads, the rest from the event loop); the
    fast path (`is_down` while up) reads one attribute."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.where = _where(url)
        self.lock = threading.Lock()
        self.since: float | None = None  # wall clock of the outage's first failure; None: up
        self.retry_at = 0.0  # time.monotonic() from which Redis is tried again
        self.error = ""
        self.pending_deletes: set[str] = set()  # raw cache keys whose invalidation did not arrive

    def is_down(self) -> bool:
        """True while callers should not even try (a failure less than REDIS_RETRY_SECONDS ago)."""
        return self.since is not None and time.monotonic() < self.retry_at

    def failed(self, component: str, exc: BaseException | None = None) -> None:
        detail = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}".rstrip(": ") \
            if exc is not None else "unavailable"
        with self.lock:
            first = self.since is None
            if first:
                self.since = time.time()
            self.retry_at = time.monotonic() + settings.REDIS_RETRY_SECONDS
            self.error = detail
        redis_unavailable(component)
        if first:
            logger.warning("Redis at %s is unavailable (%s, seen by %s): degrading until it answers "
                           "(trying again every %g s)", self.where, detail, component,
                           settings.REDIS_RETRY_SECONDS)

    def ok(self) -> None:
        """A call succeeded: the outage, if there was one, is over."""
        if self.since is None:
            return
        with self.lock:
            if self.since is None:
                return
            lasted = time.time() - self.since
            self.since = None
        logger.warning("Redis at %s answers again after %.1f s", self.where, lasted)

    def keep_deletes(self, raw_keys: list[str]) -> None:
        with self.lock:
            self.pending_deletes.update(raw_keys)

    def take_deletes(self) -> list[str]:
        """The invalidations held back by an outage, to send now (before the cache is read)."""
        with self.lock:
            pending, self.pending_deletes = self.pending_deletes, set()
        return sorted(pending)

    def status(self) -> dict[str, Any]:
        if self.since is None:
            return {"status": "ok"}
        return {"status": "error", "detail": f"unavailable for {time.time() - self.since:.0f} s: {self.error}"}


_outages: dict[str, RedisOutage] = {}
_outages_lock = threading.Lock()


def redis_outage(url: str) -> RedisOutage:
    found = _outages.get(url)
    if found is None:
        with _outages_lock:
            found = _outages.setdefault(url, RedisOutage(url))
    return found


# --- one redis.asyncio client per event loop -------------------------------------------------

_clients: dict[tuple[int, str], Any] = {}
_scripts: dict[tuple[int, str, str], Any] = {}


def async_redis(url: str) -> Any:
    """The redis.asyncio client of `url` for the running loop (its connections belong to it)."""
    loop_id = id(asyncio.get_running_loop())
    client = _clients.get((loop_id, url))
    if client is None:
        import redis.asyncio as aredis

        timeout = settings.REDIS_TIMEOUT_SECONDS
        client = aredis.from_url(url, socket_connect_timeout=timeout, socket_timeout=timeout)
        for old in [k for k in _clients if k[0] != loop_id]:
            del _clients[old]  # one loop per server process; forget clients of finished loops
        for old in [k for k in _scripts if k[0] != loop_id]:
            del _scripts[old]
        _clients[(loop_id, url)] = client
    return client


def async_redis_script(url: str, source: str) -> Any:
    """A Lua script registered with the running loop's client of `url` (EVALSHA, loaded once)."""
    ident = (id(asyncio.get_running_loop()), url, source)
    script = _scripts.get(ident)
    if script is None:
        script = _scripts[ident] = async_redis(url).register_script(source)
    return script


def redis_url() -> str:
    """The Redis that state shared by all workers lives in (rate limits, circuit breakers):
    REDIS_URL, else the django-redis cache's server; "" when there is none (the embedded
    default keeps such state in the process)."""
    if settings.REDIS_URL:
        return settings.REDIS_URL
    return _cache_server(caches["default"])


def _cache_server(backend: Any) -> str:
    if RedisCache is not None and isinstance(backend, RedisCache):
        server = backend._server
        return server[0] if isinstance(server, (list, tuple)) else server
    return ""


async def cache_get_many(keys: list[str]) -> dict[str, Any]:
    """Like cache.get_many, without blocking the event loop and in one round trip. While the
    cache's Redis is down: {} at once (callers read the database)."""
    backend = caches["default"]
    if isinstance(backend, LocMemCache):
        return backend.get_many(keys)
    url = _cache_server(backend)
    if url:
        outage = redis_outage(url)
        if outage.is_down():
            return {}
        client = backend.client  # type: ignore[attr-defined]
        made = [str(client.make_key(k)) for k in keys]
        pending = outage.take_deletes() if outage.pending_deletes else ()
        try:
            if pending:  # invalidations an outage held back go first: no stale entry is read
                await async_redis(url).delete(*pending)
                logger.info("Sent %d cache invalidations held back by the Redis outage", len(pending))
            raw = await async_redis(url).mget(made)
        except REDIS_ERRORS as exc:
            if pending:
                outage.keep_deletes(list(pending))
            outage.failed("cache", exc)
            return {}
        outage.ok()
        return {k: client.decode(v) for k, v in zip(keys, raw) if v is not None}
    return await sync_to_async(backend.get_many)(keys)


# --- the django-redis cache, outage-aware ------------------------------------------------------

if RedisCache is not None:

    class _OutageReporter:
        """django-redis' logger for ignored exceptions: it calls `.exception()` inside the except
        block of every call it turned into a miss or a no-op; that is the failure we count."""

        def __init__(self, cache: "ResilientRedisCache") -> None:
            self.cache = cache

        def exception(self, *args: Any, **kwargs: Any) -> None:
            import sys

            cause = getattr(sys.exc_info()[1], "__cause__", None)
            if cause is not None:  # None: refused without trying (down), not a new failure
                self.cache.outage.failed("cache", cause)

    class ResilientClient(DefaultClient):  # type: ignore[misc,valid-type]
        """Refuses at once while Redis is down, and probes it (PING) when the retry time comes,
        so the first call after an outage learns cheaply whether it is over."""

        def get_client(self, write: bool = True, tried: Any = None) -> Any:
            return self.get_client_with_index(write, tried)[0]

        def get_client_with_index(self, write: bool = True, tried: Any = None) -> tuple[Any, int]:
            # (DefaultClient's operations call one or the other: both come here.)
            outage = self._backend.outage
            if outage.since is None and not outage.pending_deletes:
                return super().get_client_with_index(write, tried)
            if outage.is_down():
                raise ConnectionInterrupted(connection=None)
            client, index = super().get_client_with_index(True, tried)
            pending = outage.take_deletes() if outage.pending_deletes else ()
            try:
                if pending:  # invalidations an outage held back go first: no stale entry is read
                    client.delete(*pending)
                    logger.info("Sent %d cache invalidations held back by the Redis outage", len(pending))
                else:
                    client.ping()
            except REDIS_ERRORS as exc:
                if pending:
                    outage.keep_deletes(list(pending))
                raise ConnectionInterrupted(connection=client) from exc
            outage.ok()
            return client, index

    class ResilientRedisCache(RedisCache):  # type: ignore[misc,valid-type]
        """django-redis' cache with IGNORE_EXCEPTIONS semantics (a failed read is a miss, a
        failed write a no-op) reported to the outage detector, and deletes kept for replay."""

        def __init__(self, server: str, params: dict[str, Any]) -> None:
            params = {**params, "OPTIONS": {"CLIENT_CLASS": "agentplatform.cache.ResilientClient",
                                            **params.get("OPTIONS", {})}}
            super().__init__(server, params)
            self._ignore_exceptions = True
            self._log_ignored_exceptions = True
            self.logger = _OutageReporter(self)
            self.outage = redis_outage(server[0] if isinstance(server, (list, tuple)) else server)

        def delete(self, key: Any, version: Any = None, client: Any = None) -> Any:
            result = super().delete(key, version=version, client=client)
            if self.outage.since is not None:
                self.outage.keep_deletes([str(self.make_key(key, version=version))])
            return result

        def delete_many(self, keys: Any, version: Any = None, client: Any = None) -> Any:
            keys = list(keys)
            result = super().delete_many(keys, version=version, client=client)
            if self.outage.since is not None:
                self.outage.keep_deletes([str(self.make_key(k, version=version)) for k in keys])
            return result


@receiver(setting_changed)
def _reset(*, setting: str, **kwargs) -> None:
    if setting in ("CACHES", "REDIS_URL"):
        _clients.clear()
        _scripts.clear()
        _outages.clear()

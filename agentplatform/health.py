"""Liveness, readiness and the guarded Prometheus endpoint.

/health and /health/ready are open (load balancers and orchestrators probe them without
credentials); /health touches nothing, /health/ready names each dependency's state but never
a connection string or secret, and lists the model circuits that are open (informational:
they do not make it 503). /metrics needs METRICS_TOKEN or an admin-role API key; it answers
for the host in multiprocess mode (agentplatform.metrics).
"""

from __future__ import annotations

import asyncio
import hmac
import time
import uuid

from asgiref.sync import sync_to_async
from django.conf import settings
from django.http import HttpRequest, HttpResponse, JsonResponse

from .cache import REDIS_ERRORS
from .circuit import open_circuits
from .db import run_db
from .errors import AuthenticationFailed, PermissionDenied, error_response
from .methods import http_methods

CHECK_TIMEOUT = 3.0


@http_methods("GET")
async def liveness(request: HttpRequest) -> JsonResponse:
    return JsonResponse({"status": "ok"})


def _check_database() -> str:
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute("SELECT 1")
        cursor.fetchone()
    return connection.vendor


def _check_cache() -> str:
    from django.core.cache import caches

    backend = caches["default"]
    outage = getattr(backend, "outage", None)  # agentplatform.cache.ResilientRedisCache
    if outage is not None:
        if outage.is_down():
            raise ConnectionError(f"Redis {outage.status()['detail']}")
        try:
            backend.client.get_client(write=True).ping()
        except REDIS_ERRORS as exc:
            outage.failed("cache", exc.__cause__ or exc)
            raise ConnectionError(f"Redis {outage.status()['detail']}") from exc
        outage.ok()
    key = f"health:{uuid.uuid4().hex}"
    backend.set(key, "1", 10)
    ok = backend.get(key) == "1"
    backend.delete(key)
    if not ok:
        raise RuntimeError("value written was not read back")
    return settings.CACHES["default"]["BACKEND"].rsplit(".", 1)[-1]


async def _check_channel_layer() -> str:
    from channels.layers import get_channel_layer

    layer = get_channel_layer()
    if layer is None:
        raise RuntimeError("no channel layer configured")
    if hasattr(layer, "check"):  # agentplatform.channels.ResilientRedisChannelLayer
        return await layer.check()
    channel = await layer.new_channel()
    await layer.send(channel, {"type": "health.check"})
    message = await layer.receive(channel)
    if message.get("type") != "health.check":
        raise RuntimeError("message sent was not received")
    return type(layer).__name__


def _check_broker() -> str:
    from .celery import app, broker_call

    if settings.CELERY_TASK_ALWAYS_EAGER:
        return "eager (tasks run in the web process)"

    def connect() -> str:
        with app.connection_for_write() as conn:
            conn.ensure_connection(max_retries=1, timeout=CHECK_TIMEOUT)
        return conn.transport_cls if isinstance(conn.transport_cls, str) else "connected"

    return broker_call(connect)


async def _run(name: str, check) -> tuple[str, dict]:
    started = time.perf_counter()
    try:
        # Sync checks run on the database threads, which hand connections back to the pool.
        coro = check() if asyncio.iscoroutinefunction(check) else run_db(check)
        detail = await asyncio.wait_for(coro, CHECK_TIMEOUT)
        result = {"status": "ok", "detail": detail}
    except Exception as exc:  # report, never raise: readiness must answer
        message = str(exc).splitlines()[0][:200] if str(exc) else ""
        result = {"status": "error", "detail": f"{type(exc).__name__}: {message}".rstrip(": ")}
    result["latency_ms"] = round((time.perf_counter() - started) * 1000, 1)
    return name, result


async def _circuits() -> dict:
    """The model circuits that are not closed. Reported, never a reason for 503: an open circuit
    is an upstream's failure, shared by every worker (taking this one out of the load balancer
    would not help), and fallback models may still answer; GET /api/v1/agents/{name}/health
    says what that means for an agent."""
    started = time.perf_counter()
    try:
        found = await asyncio.wait_for(open_circuits(), CHECK_TIMEOUT)
        result = {"status": "degraded" if found else "ok",
                  "detail": f"{len(found)} not closed" if found else "all closed",
                  "open": [{"model": c.name, **c.as_dict()} for c in found]}
    except Exception as exc:  # report, never raise
        result = {"status": "error", "detail": type(exc).__name__, "open": []}
    result["latency_ms"] = round((time.perf_counter() - started) * 1000, 1)
    return result


@http_methods("GET")
async def readiness(request: HttpRequest) -> JsonResponse:
    *dependencies, circuits = await asyncio.gather(
        _run("database", _check_database), _run("cache", _check_cache),
        _run("channel_layer", _check_channel_layer), _run("broker", _check_broker), _circuits())
    checks = dict(dependencies)
    ok = all(c["status"] == "ok" for c in checks.values())
    return JsonResponse({"status": "ok" if ok else "unavailable", "checks": {**checks, "circuits": circuits}},
                        status=200 if ok else 503)


@http_methods("GET")
async def metrics(request: HttpRequest) -> HttpResponse:
    from governance.selectors import presented_key

    from agents.pipeline import principal_and_agent

    presented = presented_key(request.headers)
    if presented is None:
        return error_response(AuthenticationFailed(), request)
    if not (settings.METRICS_TOKEN and hmac.compare_digest(presented.encode(), settings.METRICS_TOKEN.encode())):
        principal, _ = await principal_and_agent(presented, None)
        if principal is None:
            return error_response(AuthenticationFailed(), request)
        if not principal.is_admin:
            return error_response(PermissionDenied("Metrics need an admin key or METRICS_TOKEN."), request)
    from prometheus_client import CONTENT_TYPE_LATEST

    from .metrics import metrics_text

    # Off the event loop: in multiprocess mode this reads every process' files.
    body = await sync_to_async(metrics_text, thread_sensitive=False)()
    return HttpResponse(body, content_type=CONTENT_TYPE_LATEST)

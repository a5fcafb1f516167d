"""Idempotency-Key handling for POSTs that create work (chat, runs, OpenAI-compatible).

A client that may retry sends `Idempotency-Key: <1-255 printable ASCII characters>`; the
views wrap their work in `idempotent(request, principal, produce)`:

* First request with a key: it *claims* the key by INSERTing an IdempotencyRecord in state
  "running". The unique constraint (api_key, key) decides the race in the database, so
  duplicates arriving at the same moment on different workers cannot both win: the model is
  called once. Records are scoped per API key: another key with the same key string runs
  fresh.
* Same key, same request (sha256 of method, path and body): the stored response (status,
  content type, body, the view's own headers) with `Idempotent-Replayed: true`. A streamed
  answer (SSE) is stored as the bytes that were sent and replayed byte for byte.
* Same key, different request: 422 `idempotency_key_reused`.
* Same key while the first request is still running: the duplicate *waits* (polls the record
  with backoff, 20 ms doubling to 500 ms) and then replays the stored response. If the first
  is still running after IDEMPOTENCY_WAIT_SECONDS (default 60 s, the default agent timeout),
  409 `idempotency_in_progress` with `Retry-After: 1`. If the first one gave up its claim
  (see below) the waiting duplicate claims the key and runs itself.

What is stored: the final responses that a retry would only repeat — 2xx and 4xx that the
view returned. Not stored (the claim is deleted so a retry runs fresh): 5xx and 429, errors
raised before or instead of an answer (validation, unknown agent, rate limit, budget, guard,
upstream failure: all of them PlatformErrors the view renders), and a stream that ended with
an error event. A client that disconnects mid-stream also releases the claim (the partial
stream is not stored: replaying a truncated answer forever would be worse than running once
more; the cancelled run itself is kept by the pipeline). A worker that dies mid-request
leaves its claim "running": a claim older than IDEMPOTENCY_STALE_SECONDS (default 600 s) is
taken over by the next request with that key.

Records expire IDEMPOTENCY_TTL_SECONDS (24 h) after the first request; an expired record is
replaced by the next request with its key. `idempotency_records_purge()` deletes expired
records; claims call it opportunistically (at most every PURGE_INTERVAL_SECONDS per process,
a bounded batch), and a periodic Celery task may call it too.

The same records serve every transport through one public API: `idempotent()` for HTTP views;
`idempotency_claim()`, `idempotency_store()`, `idempotency_release()` and
`idempotency_fingerprint()` for others (the WebSocket consumer's `idempotency_key`), which
encode their own answer (the frames they sent) under the claim.

Cost: a claim (INSERT) and a store (UPDATE) per request that carries the header, on the
run_db threads. On PostgreSQL both commit with synchronous_commit off (`_relaxed_commit`):
visible at once, no fsync wait; a replay is one SELECT.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import random
import time
from datetime import datetime, timedelta
from typing import Any, AsyncIterator, Awaitable, Callable

from django.conf import settings
from django.db import DatabaseError, IntegrityError, OperationalError, connection, transaction
from django.http import HttpRequest, HttpResponse, HttpResponseBase
from django.utils import timezone

from agentplatform.db import run_db
from agentplatform.errors import Conflict, InvalidRequest, PlatformError
from agentplatform.metrics import idempotent_replayed

from .models import IdempotencyRecord

logger = logging.getLogger("governance.idempotency")

HEADER = "Idempotency-Key"
REPLAYED_HEADER = "Idempotent-Replayed"
MAX_KEY_LENGTH = 255
PURGE_INTERVAL_SECONDS = 300
PURGE_BATCH = 1000
# Headers that describe this delivery, not the answer: never stored, never replayed.
_NOT_STORED = {"content-type", "content-length", "date", "server", "set-cookie", "x-request-id", "retry-after",
               REPLAYED_HEADER.lower()}
_POLL_FIRST, _POLL_MAX = 0.02, 0.5


class IdempotencyKeyReused(PlatformError):
    http_status = 422
    code = "idempotency_key_reused"
    type = "invalid_request_error"
    message = "This Idempotency-Key was used with a different request."


class IdempotencyInProgress(Conflict):
    code = "idempotency_in_progress"
    message = "A request with this Idempotency-Key is still running; retry later."
    permanent = False


def _wait_seconds() -> float:
    return float(settings.IDEMPOTENCY_WAIT_SECONDS)


def _stale_seconds() -> float:
    return float(settings.IDEMPOTENCY_STALE_SECONDS)


def idempotency_key_of(request: HttpRequest) -> str | None:
    """The request's Idempotency-Key, validated; None when it has none."""
    key = request.headers.get(HEADER)
    if key is None:
        return None
    if not 1 <= len(key) <= MAX_KEY_LENGTH or not all(" " <= c <= "~" for c in key):
        raise InvalidRequest(f"{HEADER} must be 1-{MAX_KEY_LENGTH} printable ASCII characters.",
                             code="invalid_idempotency_key", param=HEADER)
    return key


def idempotency_fingerprint(*parts: bytes) -> str:
    """What makes two requests "the same request": sha256 over the parts, length-prefixed so
    that no two different part lists hash alike."""
    digest = hashlib.sha256()
    for part in parts:
        digest.update(len(part).to_bytes(8, "big"))
        digest.update(part)
    return digest.hexdigest()


def request_fingerprint(request: HttpRequest) -> str:
    return idempotency_fingerprint(request.method.encode(), request.path.encode(), request.body)


async def idempotency_claim(*, api_key_id: int, key: str, fingerprint: str,
                            param: str = HEADER) -> tuple[int | None, dict | None]:
    """Claim `key` for this API key, or wait for the request that holds it:
    (claim id, None) — run the request, then idempotency_store() or idempotency_release();
    (None, record) — a finished request with this key and fingerprint: replay `record`.
    Raises IdempotencyKeyReused (another request used the key) or, after IDEMPOTENCY_WAIT_SECONDS,
    IdempotencyInProgress. Cancellable at any point: a claim won while the caller was being
    cancelled is given back, never left "running"."""
    deadline = time.monotonic() + _wait_seconds()
    delay = _POLL_FIRST
    while True:
        claimed, record = await _cancel_safe_claim(api_key_id=api_key_id, key=key, fingerprint=fingerprint)
        if claimed is not None:
            return claimed, None
        while record is not None:
            if record["request_hash"] != fingerprint:
                raise IdempotencyKeyReused(param=param)
            if record["state"] == IdempotencyRecord.State.DONE:
                idempotent_replayed()
                return None, record
            if time.monotonic() >= deadline:
                raise IdempotencyInProgress(param=param, headers={"Retry-After": "1"})
            await asyncio.sleep(min(delay, max(0.0, deadline - time.monotonic())))
            delay = min(delay * 2, _POLL_MAX)
            record = await run_db(_load, api_key_id=api_key_id, key=key)
        # The first request released its claim (it failed or its client left): claim it ourselves.
        if time.monotonic() >= deadline:
            raise IdempotencyInProgress(param=param, headers={"Retry-After": "1"})


async def _cancel_safe_claim(**kwargs: Any) -> tuple[int | None, dict | None]:
    job = asyncio.ensure_future(run_db(_claim, **kwargs))
    try:
        return await asyncio.shield(job)
    except asyncio.CancelledError:
        job.add_done_callback(_release_if_claimed)
        raise


def _release_if_claimed(job: asyncio.Future) -> None:
    if not job.cancelled() and job.exception() is None and job.result()[0] is not None:
        _background.add(task := asyncio.ensure_future(idempotency_release(job.result()[0])))
        task.add_done_callback(_background.discard)


_background: set[asyncio.Future] = set()


async def idempotency_store(claim: int, *, status: int, content_type: str, headers: dict, body: bytes) -> None:
    """The finished answer under the claim, for replays (shielded: a cancel cannot cut it short)."""
    await asyncio.shield(run_db(_store, record_id=claim, status=status, content_type=content_type,
                                headers=headers, body=body))


async def idempotency_release(claim: int) -> None:
    """Give the claim up (the request failed or was cancelled): the next request with the key
    runs. Shielded; a failure is logged (the claim then expires as stale)."""
    try:
        await asyncio.shield(run_db(_release, record_id=claim))
    except Exception:
        logger.exception("Could not release an idempotency claim")


async def idempotent(request: HttpRequest, principal: Any,
                     produce: Callable[[], Awaitable[HttpResponseBase]]) -> HttpResponseBase:
    """Return produce()'s response, or the stored one for a retry with the same Idempotency-Key."""
    if request.method != "POST" or principal is None:
        return await produce()
    key = idempotency_key_of(request)
    if key is None:
        return await produce()
    claimed, record = await idempotency_claim(api_key_id=principal.key_id, key=key,
                                              fingerprint=request_fingerprint(request))
    if record is not None:
        return _replay(record)
    return await _produce_and_store(claimed, produce)


# --- database work (run_db threads) ------------------------------------------------------

_FIELDS = ("id", "request_hash", "state", "status_code", "content_type", "headers", "body", "created_at",
           "expires_at")
_last_purge = 0.0


def _relaxed_commit() -> None:
    """On PostgreSQL, commit this transaction without waiting for the WAL flush: the row is
    visible to every other connection at once (the unique constraint still decides races), and
    only a crash of the database server itself could lose the last moments of claims and
    stored answers, after which a retry runs once more. It saves an fsync per claim and store."""
    if connection.vendor == "postgresql":
        with connection.cursor() as cursor:
            cursor.execute("SET LOCAL synchronous_commit TO OFF")


def _retry_locked(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Run a write, retrying while SQLite reports its database locked. A file database waits
    (busy_timeout) and rarely gets here; a shared-cache one (the in-memory test database)
    refuses concurrent writers at once. Other databases: a plain call."""
    if connection.vendor != "sqlite":
        return fn(*args, **kwargs)
    deadline = time.monotonic() + 10
    while True:
        try:
            return fn(*args, **kwargs)
        except OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.005 + random.random() * 0.02)  # a database thread, not the event loop


def _load(*, api_key_id: int, key: str) -> dict | None:
    return IdempotencyRecord.objects.filter(api_key_id=api_key_id, key=key).values(*_FIELDS).first()


def _claim(*, api_key_id: int, key: str, fingerprint: str) -> tuple[int | None, dict | None]:
    """(id of our new claim, None), or (None, the record that holds the key)."""
    global _last_purge
    if time.monotonic() - _last_purge > PURGE_INTERVAL_SECONDS:
        _last_purge = time.monotonic()
        try:
            idempotency_records_purge()
        except DatabaseError:  # housekeeping: never fail the request for it
            logger.warning("Could not purge expired idempotency records", exc_info=True)
    record = None
    unexplained: IntegrityError | None = None
    for _ in range(5):
        now = timezone.now()
        try:
            return _retry_locked(_insert, api_key_id=api_key_id, key=key, fingerprint=fingerprint, now=now), None
        except IntegrityError as exc:
            unexplained = exc  # someone holds the key, unless no record does (below)
        record = _load(api_key_id=api_key_id, key=key)
        if record is None:
            continue  # released meanwhile: try again
        stale = (record["state"] == IdempotencyRecord.State.RUNNING
                 and record["created_at"] < now - timedelta(seconds=_stale_seconds()))
        if record["expires_at"] <= now or stale:
            # Expired, or abandoned by a dead worker: replace it. Conditional on its id, so of
            # several requests doing this at once one deletes and the others lose the INSERT.
            _retry_locked(IdempotencyRecord.objects.filter(pk=record["id"]).delete)
            continue
        return None, record
    if record is None and unexplained is not None:
        # Five refusals and never a record holding the key: not the (api_key, key) constraint
        # (e.g. the key's row is gone), so not "in use" either: fail loudly, never wait it out.
        raise unexplained
    return None, record


def _insert(*, api_key_id: int, key: str, fingerprint: str, now: datetime) -> int:
    with transaction.atomic():
        _relaxed_commit()
        created = IdempotencyRecord.objects.create(
            api_key_id=api_key_id, key=key, request_hash=fingerprint, state=IdempotencyRecord.State.RUNNING,
            created_at=now, expires_at=now + timedelta(seconds=settings.IDEMPOTENCY_TTL_SECONDS))
    return created.pk


def _store(*, record_id: int, status: int, content_type: str, headers: dict, body: bytes) -> None:
    _retry_locked(_update, record_id=record_id, status=status, content_type=content_type, headers=headers, body=body)


def _update(*, record_id: int, status: int, content_type: str, headers: dict, body: bytes) -> None:
    with transaction.atomic():
        _relaxed_commit()
        IdempotencyRecord.objects.filter(pk=record_id).update(
            state=IdempotencyRecord.State.DONE, status_code=status, content_type=content_type[:100], headers=headers,
            body=body)


def _release(*, record_id: int) -> None:
    _retry_locked(IdempotencyRecord.objects.filter(pk=record_id, state=IdempotencyRecord.State.RUNNING).delete)


def idempotency_records_purge(*, now: datetime | None = None, batch: int = PURGE_BATCH) -> int:
    """Delete expired idempotency records (at most `batch`); returns how many."""
    now = now or timezone.now()
    ids = list(IdempotencyRecord.objects.filter(expires_at__lt=now).values_list("pk", flat=True)[:batch])
    if not ids:
        return 0
    deleted, _ = IdempotencyRecord.objects.filter(pk__in=ids).delete()
    return deleted


# --- producing, storing, replaying --------------------------------------------------------


def _storable(status: int) -> bool:
    return status < 500 and status != 429


def _kept_headers(response: HttpResponseBase) -> dict[str, str]:
    return {name: value for name, value in response.items()
            if name.lower() not in _NOT_STORED and not name.lower().startswith("x-ratelimit-")}


async def _produce_and_store(record_id: int, produce: Callable[[], Awaitable[HttpResponseBase]]) -> HttpResponseBase:
    try:
        response = await produce()
    except BaseException:
        await idempotency_release(record_id)
        raise
    if not _storable(response.status_code):
        await idempotency_release(record_id)
        return response
    content_type = response.get("Content-Type", "")
    headers = _kept_headers(response)
    if response.streaming:
        response.streaming_content = _tee(response.streaming_content, record_id=record_id,
                                          status=response.status_code, content_type=content_type, headers=headers)
        return response
    try:
        await idempotency_store(record_id, status=response.status_code, content_type=content_type,
                                headers=headers, body=bytes(response.content))
    except Exception:
        await idempotency_release(record_id)
        raise
    return response


def _stream_failed(body: bytes) -> bool:
    """Our two SSE formats end a failed run with an `error` event (REST) or an `error` object
    (OpenAI-compatible): a failure a retry may not repeat, so it is not stored."""
    return (body.startswith(b"event: error\n") or b"\n\nevent: error\n" in body
            or body.startswith(b'data: {"error"') or b'\n\ndata: {"error"' in body)


async def _tee(source: AsyncIterator[bytes], *, record_id: int, status: int, content_type: str,
               headers: dict) -> AsyncIterator[bytes]:
    """Pass the stream through; store its bytes when it ends, release the claim otherwise."""
    parts: list[bytes] = []
    finished = False
    try:
        async for chunk in source:
            parts.append(chunk)
            yield chunk
        finished = True
    finally:
        body = b"".join(parts)
        if finished and not _stream_failed(body):
            try:
                await idempotency_store(record_id, status=status, content_type=content_type, headers=headers,
                                        body=body)
            except Exception:
                await idempotency_release(record_id)
                raise
        else:
            await idempotency_release(record_id)


def _replay(record: dict) -> HttpResponse:
    response = HttpResponse(bytes(record["body"]), status=record["status_code"],
                            content_type=record["content_type"] or None)
    for name, value in (record["headers"] or {}).items():
        response[name] = value
    response[REPLAYED_HEADER] = "true"
    return response

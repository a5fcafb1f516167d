"""API-key state (status, status filter) and usage on the request path: last_used_at, updated cheaply.

last_used_at is written at most once a minute per key, across all workers:

1. a per-process memo (prefix → when this process last claimed the minute) answers almost
   every request with a dict lookup and no I/O;
2. when the memo says a minute has passed, `cache.add("key-used:<prefix>", 1, 60)` in the
   shared cache claims the minute for one worker (add is atomic: only the first worker of
   the minute gets True);
3. that worker writes the stamp with a single UPDATE by primary key.

Where the write happens: in KeyUsageStage.persist(turn), i.e. inside the transaction that
stores the run (agentplatform.db's group commit). It costs no extra transaction, no extra
thread hop and nothing before the model is called; the stamp commits with the run it
describes. The UPDATE bypasses model.save() on purpose: last_used_at is not part of the cached
key entry, and dropping that entry on every usage stamp would cost every worker a query.

Sync views (the admin REST API, and any view that calls it) use `key_used(principal)`, the
same three steps in the request's own thread.

Precision: "last used" is accurate to a minute. When the run's transaction rolls back after a
worker claimed the minute, that minute's stamp is lost; the next minute writes it again.
"""

from __future__ import annotations

import threading
import time

from django.core.cache import cache
from django.db import connection
from django.db.models import Q, QuerySet
from django.utils import timezone

from .models import ApiKey
from .principal import Principal

USAGE_WRITE_SECONDS = 60
STATUSES = ("active", "revoked", "expired", "disabled")


# --- status ---------------------------------------------------------------------------------


def api_key_status(key: ApiKey) -> str:
    """active, revoked, expired or disabled (in that order of precedence, revoked first)."""
    now = timezone.now()
    if key.revoked_at is not None:
        return "revoked"
    if key.expires_at is not None and key.expires_at <= now:
        return "expired"
    if not key.enabled:
        return "disabled"
    return "active"


def api_keys_with_status(queryset: QuerySet, status: str) -> QuerySet:
    """The keys of `queryset` whose api_key_status() is `status`."""
    now = timezone.now()
    live = Q(revoked_at__isnull=True)
    unexpired = Q(expires_at__isnull=True) | Q(expires_at__gt=now)
    match status:
        case "active":
            return queryset.filter(live & unexpired, enabled=True)
        case "revoked":
            return queryset.filter(revoked_at__isnull=False)
        case "expired":
            return queryset.filter(live, expires_at__lte=now)
        case "disabled":
            return queryset.filter(live & unexpired, enabled=False)
    raise ValueError(f"unknown status {status!r}")


# --- last_used_at -----------------------------------------------------------------------------

_claimed: dict[str, float] = {}
_claimed_lock = threading.Lock()
# Bound the memo: a process that sees very many keys forgets them all rather than grow.
_MEMO_LIMIT = 10_000


def usage_cache_key(prefix: str) -> str:
    return f"key-used:{prefix}"


def _claim_minute(prefix: str) -> bool:
    """True for exactly one caller per key per minute across workers (per process first)."""
    now = time.monotonic()
    with _claimed_lock:
        if _claimed.get(prefix, 0.0) > now:
            return False
        if len(_claimed) >= _MEMO_LIMIT:
            _claimed.clear()
        _claimed[prefix] = now + USAGE_WRITE_SECONDS
    return bool(cache.add(usage_cache_key(prefix), 1, USAGE_WRITE_SECONDS))


def _stamp(key_id: int) -> None:
    rows = ApiKey.objects.filter(pk=key_id)
    if connection.in_atomic_block:
        # Inside a run's group commit: SKIP LOCKED, a row locked by a change of keys
        # (governance.services._lock) is not waited for while the batch holds other rows; that
        # minute's stamp is lost, as when the run's transaction rolls back.
        rows = ApiKey.objects.filter(pk__in=rows.select_for_update(no_key=True, skip_locked=True).values("pk"))
    rows.update(last_used_at=timezone.now())


def key_used(principal: Principal | None) -> None:
    """Record a use of the key (sync; at most one UPDATE per key per minute)."""
    if isinstance(principal, Principal) and _claim_minute(principal.prefix):
        _stamp(principal.key_id)


def forget_key_usage() -> None:
    """Clear this process's memo (tests simulate the minute passing with this and cache.clear())."""
    with _claimed_lock:
        _claimed.clear()


class KeyUsageStage:
    """Pipeline stage: stamps last_used_at in the run's own transaction (see the module docstring)."""

    def persist(self, turn) -> None:
        key_used(turn.principal)

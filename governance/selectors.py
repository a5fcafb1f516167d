"""Reads for authentication: a presented key → Principal, through the shared cache.

Steady state costs one cache round trip and no database query. The cache entry holds the
secret's hash (never the secret), so a wrong secret for a valid prefix is refused without a
query; every change of a key or of its links to agents deletes the entry (governance.signals).
"""

from __future__ import annotations

import hmac
import time

from django.conf import settings
from django.core.cache import cache

from .models import ApiKey
from .principal import Principal
from .services import hash_secret, split_key

_MISSING = {"missing": True}


def api_key_cache_key(prefix: str) -> str:
    return f"apikey:{prefix}"


def _entry_from_db(prefix: str) -> dict:
    api_key = ApiKey.objects.filter(prefix=prefix).prefetch_related("agents").first()
    if api_key is None:
        return _MISSING
    return {
        "id": api_key.pk,
        "prefix": api_key.prefix,
        "name": api_key.name,
        "role": api_key.role,
        "hash": api_key.secret_hash,
        # None means all; a list, even an empty one, is all the key may use.
        "agents": None if api_key.all_agents else sorted(a.name for a in api_key.agents.all()),
        "skills": None if api_key.all_skills else sorted(api_key.allowed_skills),
        "rpm": api_key.rate_limit_rpm,
        "tpm": api_key.rate_limit_tpm,
        "active": api_key.enabled and api_key.revoked_at is None,
        "expires": api_key.expires_at.timestamp() if api_key.expires_at else None,
        "prev_hash": api_key.previous_secret_hash or None,
        "prev_expires": (api_key.previous_secret_expires_at.timestamp()
                         if api_key.previous_secret_expires_at else None),
    }


def api_key_entry(prefix: str) -> dict:
    key = api_key_cache_key(prefix)
    entry = cache.get(key)
    if entry is None:
        entry = _entry_from_db(prefix)
        cache.set(key, entry, settings.AGENT_CACHE_SECONDS)
    return entry


def principal_from_entry(entry: dict | None, presented: str) -> Principal | None:
    """Check a presented key against its cache entry; None when it does not authenticate."""
    if not entry or entry.get("missing"):
        return None
    presented_hash = hash_secret(presented)
    now = time.time()
    current = hmac.compare_digest(entry["hash"], presented_hash)
    # The previous secret of a rotated key works until its grace period ends.
    previous = (entry.get("prev_hash") is not None and entry.get("prev_expires") is not None
                and hmac.compare_digest(entry["prev_hash"], presented_hash) and entry["prev_expires"] > now)
    if not (current or previous):
        return None
    return _principal_if_active(entry, now)


def _principal_if_active(entry: dict, now: float) -> Principal | None:
    if not entry["active"]:
        return None
    if entry["expires"] is not None and entry["expires"] <= now:
        return None
    agents = entry["agents"]
    skills = entry.get("skills")
    return Principal(key_id=entry["id"], prefix=entry["prefix"], name=entry["name"], role=entry["role"],
                     agents=frozenset(agents) if agents is not None else None,
                     skills=frozenset(skills) if skills is not None else None,
                     rate_limit_rpm=entry.get("rpm"), rate_limit_tpm=entry.get("tpm"))


def principal_for_key(presented: str) -> Principal | None:
    prefix = split_key(presented)
    if prefix is None:
        return None
    return principal_from_entry(api_key_entry(prefix), presented)


def principal_for_key_id(key_id: int) -> Principal | None:
    """The key with this id as it is now, without its secret: for work a key started earlier and
    that runs later (async runs), which must stop once the key is revoked, disabled, expired or
    deleted (None then). One indexed query for the prefix, then the cached entry."""
    prefix = ApiKey.objects.filter(pk=key_id).values_list("prefix", flat=True).first()
    if prefix is None:
        return None
    entry = api_key_entry(prefix)
    if not entry or entry.get("missing"):
        return None
    return _principal_if_active(entry, time.time())


def presented_key(headers) -> str | None:
    """The key from `Authorization: Bearer <key>` or `X-API-Key: <key>`."""
    auth = headers.get("Authorization") or ""
    if auth:
        scheme, _, value = auth.partition(" ")
        if scheme.lower() == "bearer" and value.strip():
            return value.strip()
    value = headers.get("X-API-Key")
    return value.strip() if value else None

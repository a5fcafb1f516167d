"""API-key rules: creation (secret shown once), revocation, and the principal a request carries.

Key format: `ap_<prefix>_<secret>`. The prefix (12 hex chars) is not secret: it identifies the
key in the admin, logs and audit entries and is how a presented key is looked up. Only the
sha256 of the whole key is stored; sha256 suffices because the secret is 256 random bits,
so there is nothing to brute-force that a slow hash would protect.
"""

from __future__ import annotations

import hashlib
import secrets
from datetime import datetime

from django.db import transaction
from django.utils import timezone

from agentplatform.errors import InvalidRequest

from .models import ApiKey

KEY_PREFIX = "ap_"


def hash_secret(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def split_key(key: str) -> str | None:
    """The lookup prefix of a presented key, or None when it is not shaped like one of ours."""
    if not key.startswith(KEY_PREFIX) or len(key) > 200:
        return None
    prefix, sep, secret = key[len(KEY_PREFIX):].partition("_")
    if not sep or not prefix or not secret or len(prefix) > 32:
        return None
    return prefix


def _new_key() -> tuple[str, str]:
    prefix = secrets.token_hex(6)
    return prefix, f"{KEY_PREFIX}{prefix}_{secrets.token_urlsafe(32)}"


@transaction.atomic
def api_key_create(
    *,
    name: str,
    role: str,
    agent_names: list[str] | None = None,
    expires_at: datetime | None = None,
    created_by=None,
) -> tuple[ApiKey, str]:
    """Create a key; returns it and the full secret, which is never retrievable again."""
    from agents.models import Agent

    if role not in ApiKey.Role.values:
        raise InvalidRequest(f"role must be one of {', '.join(ApiKey.Role.values)}.", param="role")
    if not name or len(name) > 100:
        raise InvalidRequest("name must be 1-100 characters.", param="name")
    agents = []
    if agent_names:
        agents = list(Agent.objects.filter(name__in=agent_names))
        missing = sorted(set(agent_names) - {a.name for a in agents})
        if missing:
            raise InvalidRequest(f"Unknown agents: {', '.join(missing)}.", param="agents")
    prefix, key = _new_key()
    api_key = ApiKey.objects.create(name=name, role=role, prefix=prefix, secret_hash=hash_secret(key),
                                    expires_at=expires_at, created_by=created_by)
    if agents:
        api_key.agents.set(agents)
    return api_key, key


@transaction.atomic
def api_key_revoke(*, api_key: ApiKey) -> ApiKey:
    """Revoke a key: every worker refuses it from its next request (the cache entry is dropped on save)."""
    if api_key.revoked_at is None:
        api_key.revoked_at = timezone.now()
        api_key.save(update_fields=["revoked_at"])
    return api_key

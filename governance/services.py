"""API-key rules: creation (secret shown once), rotation, revocation, updates.

Key format: `ap_<prefix>_<secret>`. The prefix (12 hex chars) is not secret: it identifies the
key in the admin, logs and audit entries and is how a presented key is looked up. Only the
sha256 of the whole key is stored; sha256 suffices because the secret is 256 random bits,
so there is nothing to brute-force that a slow hash would protect.

Every change goes through `model.save()` (or the M2M manager) so that governance.signals drops
the key's entry from the shared cache: the next request on any worker reads the new state.
Every change writes its audit entry in the same transaction; audit details name the key by
its prefix and never carry a secret or a hash.

Actors are "user:<username>" (the Django admin), "key:<prefix>" (the admin REST API) or
"system" (management commands, fixtures).

Scopes are explicit: a key is for all agents (`all_agents`) or for the agents linked to it, and
for all skills (`all_skills`) or for those named in `allowed_skills`. An empty list on a
restricted key means none, never all: deleting a key's last agent cannot widen it. In the
services' arguments a list alone restricts the key to it; `all_agents=True` (`all_skills=True`)
opens it to all and clears the list; giving neither keeps the scope (on create: all).

The admin REST API may not take away the last active admin key (`protect_last_admin`): a key
that demoted, disabled, revoked or expired itself would leave no key that can manage keys.
Staff in the Django admin and `manage.py create_api_key --role admin` can always make a new one,
so those doors are not guarded.
"""

from __future__ import annotations

import hashlib
import secrets
from datetime import datetime, timedelta
from typing import Any

from django.conf import settings
from django.db import connection, transaction
from django.utils import timezone

from agentplatform.errors import Conflict, InvalidRequest

from .keys import api_key_status
from .models import ApiKey

KEY_PREFIX = "ap_"
# A rotation's grace period is capped: an "old" secret that lives for months is no rotation.
MAX_GRACE_SECONDS = 30 * 24 * 3600
# What api_key_update may change; the secret, prefix and state timestamps have their own services.
UPDATABLE_FIELDS = frozenset({"name", "role", "all_agents", "agents", "all_skills", "allowed_skills",
                              "rate_limit_rpm", "rate_limit_tpm", "expires_at", "enabled"})
LAST_ADMIN_KEY_MESSAGE = (
    "This is the last active admin key: it cannot be demoted, disabled, revoked or expired, or no key could "
    "manage keys any more. Create another admin key first (POST /api/v1/admin/api-keys, or on the server "
    "`manage.py create_api_key --name NAME --role admin`), then change this one with it.")


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


def user_actor(user: Any) -> str:
    """How audit entries name a signed-in staff user."""
    return f"user:{user.get_username()}"


def _new_key() -> tuple[str, str]:
    prefix = secrets.token_hex(6)
    return prefix, _new_secret(prefix)


def _new_secret(prefix: str) -> str:
    return f"{KEY_PREFIX}{prefix}_{secrets.token_urlsafe(32)}"


def _audit(*, actor: str, action: str, api_key: ApiKey, details: dict, request_id: str,
           client_ip: str | None) -> None:
    # Imported here: the audit module may read keys through the selectors, which import this module.
    from .audit import audit_record

    audit_record(actor=actor, action=action, target=f"api_key:{api_key.prefix}", outcome="success",
                 details={"prefix": api_key.prefix, "name": api_key.name, **details},
                 request_id=request_id or "", client_ip=client_ip)


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value is not None else None


def _shown(value: Any) -> Any:
    return _iso(value) if isinstance(value, datetime) else value


def _check_name(name: Any) -> str:
    if not isinstance(name, str) or not name.strip() or len(name) > 100:
        raise InvalidRequest("name must be 1-100 characters.", param="name")
    return name


def _check_role(role: Any) -> str:
    if role not in ApiKey.Role.values:
        raise InvalidRequest(f"role must be one of {', '.join(ApiKey.Role.values)}.", param="role")
    return role


def _check_limit(value: Any, param: str) -> int | None:
    if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
        raise InvalidRequest(f"{param} must be a positive integer or null.", param=param)
    return value


def _scope_is_all(*, everything: Any, names: Any, current: bool, flag: str, listed: str) -> bool:
    """all_agents (all_skills) after a request that gave `everything` (the flag) and `names` (the
    list), None for either when not given: a list alone restricts the key to it, even an empty one
    (then to nothing); neither keeps `current`."""
    if everything is None:
        return False if names is not None else current
    if not isinstance(everything, bool):
        raise InvalidRequest(f"{flag} must be true or false.", param=flag)
    if everything and names:
        raise InvalidRequest(f"{listed} must be empty or left out when {flag} is true (the key has them all); "
                             f"set {flag} to false to limit the key to {listed}.", param=listed)
    return everything


def _agents_named(names: list[str] | None) -> list:
    from agents.models import Agent

    if names is None:
        return []
    if not isinstance(names, list) or not all(isinstance(n, str) and n for n in names):
        raise InvalidRequest("agents must be a list of agent names.", param="agents")
    if not names:
        return []
    agents = list(Agent.objects.filter(name__in=names))
    missing = sorted(set(names) - {a.name for a in agents})
    if missing:
        raise InvalidRequest(f"Unknown agents: {', '.join(missing)}.", param="agents")
    return agents


def _skills_named(names: list[str] | None) -> list[str]:
    from agents.models import Skill

    if names is None:
        return []
    if not isinstance(names, list) or not all(isinstance(n, str) and n for n in names):
        raise InvalidRequest("allowed_skills must be a list of skill names.", param="allowed_skills")
    if not names:
        return []
    known = set(Skill.objects.filter(name__in=names).values_list("name", flat=True))
    missing = sorted(set(names) - known)
    if missing:
        raise InvalidRequest(f"Unknown skills in allowed_skills: {', '.join(missing)}.", param="allowed_skills")
    return sorted(set(names))


# PostgreSQL advisory lock key of key changes ("apikeys" in ASCII).
API_KEY_CHANGES_LOCK = 0x6170696B657973


def _key_changes_lock() -> None:
    if connection.vendor == "postgresql":
        with connection.cursor() as cursor:
            cursor.execute("SELECT pg_advisory_xact_lock(%s)", [API_KEY_CHANGES_LOCK])


def _is_active_admin(key: ApiKey) -> bool:
    return key.role == ApiKey.Role.ADMIN and api_key_status(key) == "active"


def _lock(api_key: ApiKey, *, protect_last_admin: bool) -> tuple[ApiKey, bool]:
    """The key's row, locked, and whether another active admin key exists (True when not protecting).

    Lock order: the key changes' advisory lock first, then rows. The lock serializes changes of
    keys, so two requests that each take away an admin key (their own, or each other's) run one
    after the other and the second reads what the first committed. The rows are then locked FOR
    NO KEY UPDATE: runs, sessions and idempotency records that reference a key share its row
    (FOR KEY SHARE), which must not wait for us nor we for them; the last_used_at stamps of the
    run path skip a row locked here rather than wait (governance.keys), so a group commit that
    stamps several keys never holds one we want while waiting for one we hold.
    """
    _key_changes_lock()
    keys = ApiKey.objects.select_for_update(no_key=True)
    another_admin = True
    if protect_last_admin:
        admins = keys.filter(role=ApiKey.Role.ADMIN).order_by("pk")
        another_admin = any(key.pk != api_key.pk and api_key_status(key) == "active" for key in admins)
    return keys.get(pk=api_key.pk), another_admin


@transaction.atomic
def api_key_create(
    *,
    name: str,
    role: str,
    agent_names: list[str] | None = None,
    all_agents: bool | None = None,
    allowed_skills: list[str] | None = None,
    all_skills: bool | None = None,
    rate_limit_rpm: int | None = None,
    rate_limit_tpm: int | None = None,
    expires_at: datetime | None = None,
    created_by=None,
    actor: str = "system",
    request_id: str = "",
    client_ip: str | None = None,
) -> tuple[ApiKey, str]:
    """Create a key; returns it and the full secret, which is never retrievable again.

    Agents: `agent_names` alone limits the key to them ([]: to none); `all_agents=True` or
    neither makes it a key for all agents. Skills likewise (`allowed_skills`, `all_skills`)."""
    _check_role(role)
    _check_name(name)
    _check_limit(rate_limit_rpm, "rate_limit_rpm")
    _check_limit(rate_limit_tpm, "rate_limit_tpm")
    all_agents = _scope_is_all(everything=all_agents, names=agent_names, current=True, flag="all_agents",
                               listed="agents")
    all_skills = _scope_is_all(everything=all_skills, names=allowed_skills, current=True, flag="all_skills",
                               listed="allowed_skills")
    agents = [] if all_agents else _agents_named(agent_names)
    skills = [] if all_skills else _skills_named(allowed_skills)
    prefix, key = _new_key()
    api_key = ApiKey.objects.create(name=name, role=role, prefix=prefix, secret_hash=hash_secret(key),
                                    all_agents=all_agents, all_skills=all_skills, allowed_skills=skills,
                                    rate_limit_rpm=rate_limit_rpm, rate_limit_tpm=rate_limit_tpm,
                                    expires_at=expires_at, created_by=created_by)
    if agents:
        api_key.agents.set(agents)
    _audit(actor=actor, action="api_key.created", api_key=api_key, request_id=request_id, client_ip=client_ip,
           details={"role": role, "all_agents": all_agents, "agents": sorted(a.name for a in agents),
                    "all_skills": all_skills, "allowed_skills": skills, "rate_limit_rpm": rate_limit_rpm,
                    "rate_limit_tpm": rate_limit_tpm, "expires_at": _iso(expires_at)})
    return api_key, key


@transaction.atomic
def api_key_rotate(
    *,
    api_key: ApiKey,
    grace_seconds: int | None = None,
    actor: str,
    request_id: str = "",
    client_ip: str | None = None,
) -> tuple[ApiKey, str]:
    """Give the key a new secret; returns the key and the new secret (shown once).

    The new secret works at once. The one it replaces keeps working until now + grace_seconds
    (default settings.API_KEY_ROTATION_GRACE_SECONDS); grace 0 stops it at once. A key keeps
    one previous secret: rotating again within the grace period makes the secret just
    replaced the previous one, and the secret before it stops working at once.
    """
    if grace_seconds is None:
        grace_seconds = settings.API_KEY_ROTATION_GRACE_SECONDS
    if isinstance(grace_seconds, bool) or not isinstance(grace_seconds, int) or not (
            0 <= grace_seconds <= MAX_GRACE_SECONDS):
        raise InvalidRequest(f"grace_seconds must be an integer from 0 to {MAX_GRACE_SECONDS}.",
                             param="grace_seconds")
    # Locked: two concurrent rotations must not both demote the same secret.
    locked, _ = _lock(api_key, protect_last_admin=False)
    if locked.revoked_at is not None:
        raise Conflict("A revoked key cannot be rotated.", code="api_key_revoked")
    now = timezone.now()
    dropped_previous = bool(locked.previous_secret_hash and locked.previous_secret_expires_at
                            and locked.previous_secret_expires_at > now)
    secret = _new_secret(locked.prefix)
    if grace_seconds > 0:
        locked.previous_secret_hash = locked.secret_hash
        locked.previous_secret_expires_at = now + timedelta(seconds=grace_seconds)
    else:
        locked.previous_secret_hash = ""
        locked.previous_secret_expires_at = None
    locked.secret_hash = hash_secret(secret)
    locked.rotated_at = now
    locked.save(update_fields=["secret_hash", "previous_secret_hash", "previous_secret_expires_at", "rotated_at"])
    _audit(actor=actor, action="api_key.rotated", api_key=locked, request_id=request_id, client_ip=client_ip,
           details={"grace_seconds": grace_seconds,
                    "previous_secret_expires_at": _iso(locked.previous_secret_expires_at),
                    # An earlier secret still in its grace period stopped working with this rotation.
                    "ended_earlier_grace": dropped_previous})
    _copy_state(locked, api_key)
    return api_key, secret


@transaction.atomic
def api_key_revoke(
    *,
    api_key: ApiKey,
    actor: str = "system",
    request_id: str = "",
    client_ip: str | None = None,
    protect_last_admin: bool = False,
) -> ApiKey:
    """Revoke a key: every secret of it (current and previous) stops working on every worker from
    its next request (the save drops the shared cache entry). Revoking a revoked key changes nothing.
    With protect_last_admin, the last active admin key is refused (409 last_admin_key)."""
    locked, another_admin = _lock(api_key, protect_last_admin=protect_last_admin)
    if locked.revoked_at is None:
        if _is_active_admin(locked) and not another_admin:
            raise Conflict(LAST_ADMIN_KEY_MESSAGE, code="last_admin_key")
        locked.revoked_at = timezone.now()
        # The cached entry refuses a revoked key whatever secret it shows; dropping the previous
        # secret as well leaves nothing that could authenticate, should the key ever be re-enabled.
        locked.previous_secret_hash = ""
        locked.previous_secret_expires_at = None
        locked.save(update_fields=["revoked_at", "previous_secret_hash", "previous_secret_expires_at"])
        _audit(actor=actor, action="api_key.revoked", api_key=locked, request_id=request_id, client_ip=client_ip,
               details={"revoked_at": _iso(locked.revoked_at)})
    _copy_state(locked, api_key)
    return api_key


@transaction.atomic
def api_key_update(
    *,
    api_key: ApiKey,
    fields: dict[str, Any],
    actor: str,
    request_id: str = "",
    client_ip: str | None = None,
    protect_last_admin: bool = False,
) -> ApiKey:
    """Change a key's name, role, scopes (all_agents, agents as names, all_skills, allowed_skills:
    see the module docstring), rate limits, expires_at or enabled. Unknown fields are refused;
    unchanged values are not audited. With protect_last_admin, a change that would leave no active
    admin key (demoting, disabling or expiring the last one) is refused (409 last_admin_key)."""
    unknown = sorted(set(fields) - UPDATABLE_FIELDS)
    if unknown:
        raise InvalidRequest(f"Unknown or read-only field: {unknown[0]}.", param=unknown[0])
    locked, another_admin = _lock(api_key, protect_last_admin=protect_last_admin)
    was_active_admin = _is_active_admin(locked)
    changed: dict[str, Any] = {}
    columns: list[str] = []
    all_agents = _scope_is_all(everything=fields.get("all_agents"), names=fields.get("agents"),
                               current=locked.all_agents, flag="all_agents", listed="agents")
    all_skills = _scope_is_all(everything=fields.get("all_skills"), names=fields.get("allowed_skills"),
                               current=locked.all_skills, flag="all_skills", listed="allowed_skills")
    scoped = dict(fields, all_agents=all_agents, all_skills=all_skills)
    if all_skills:
        scoped["allowed_skills"] = []
    for field, value in scoped.items():
        if field == "agents":
            continue
        if field == "name":
            value = _check_name(value)
        elif field == "role":
            value = _check_role(value)
        elif field in ("rate_limit_rpm", "rate_limit_tpm"):
            value = _check_limit(value, field)
        elif field == "allowed_skills":
            value = _skills_named(value)
        elif field == "enabled":
            if not isinstance(value, bool):
                raise InvalidRequest("enabled must be true or false.", param="enabled")
        before = getattr(locked, field)
        if before != value:
            setattr(locked, field, value)
            columns.append(field)
            changed[field] = {"from": _shown(before), "to": _shown(value)}
    # Validated before anything is written; a key for all agents keeps no links.
    agents = [] if all_agents else _agents_named(fields["agents"]) if "agents" in fields else None
    if was_active_admin and not _is_active_admin(locked) and not another_admin:
        raise Conflict(LAST_ADMIN_KEY_MESSAGE, code="last_admin_key")
    if columns:
        locked.save(update_fields=columns)
    if agents is not None:
        before = sorted(locked.agents.values_list("name", flat=True))
        after = sorted(a.name for a in agents)
        if before != after:
            locked.agents.set(agents)  # m2m_changed drops the cache entry
            changed["agents"] = {"from": before, "to": after}
    if changed:
        _audit(actor=actor, action="api_key.updated", api_key=locked, request_id=request_id, client_ip=client_ip,
               details={"changed": changed})
    _copy_state(locked, api_key)
    return api_key


def _copy_state(source: ApiKey, target: ApiKey) -> None:
    """Let the caller's instance reflect what was stored (they may be the same object)."""
    if source is target:
        return
    for field in ApiKey._meta.concrete_fields:
        setattr(target, field.attname, getattr(source, field.attname))

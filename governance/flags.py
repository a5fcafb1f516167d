"""Feature flags: evaluation, the shared cache of all flags, and the pipeline stage.

Evaluation (`flag_enabled`), for one caller (API-key prefix, role, agent):
  1. a disabled flag is off for everybody;
  2. a caller matched by any targeting list (its key prefix in `target_key_prefixes`, its
     role in `target_roles`, the agent in `target_agents`) has it on;
  3. everybody else is in the rollout: on when
         int(sha256(f"{name}:{key_prefix}").hexdigest()[:8], 16) % 100 < rollout_percentage
     — stable per key (a key stays in or out as long as the percentage does not shrink past
     it), independent between flags (the name is in the hash), and the same on every worker.
     So targets are added on top of the rollout: "only these targets" is rollout 0.

Naming convention (what the platform reads; other names are free for clients to query):
  `streaming`       when it exists and is off for the caller, a `stream: true` chat request
                    is refused with 403 `streaming_disabled` (REST/SSE and OpenAI-compatible
                    alike). Refused rather than silently answered as JSON: a client that asked
                    for a stream would otherwise misread the body. Non-stream requests are
                    unaffected. No flag named `streaming` means streaming is allowed.
  `skill.<name>`    when it exists and is off for the caller and agent, skill <name> is removed
                    from the turn's skills and never offered to the model. Per agent: e.g.
                    enabled, rollout 0, target_agents ["support"] offers the skill to the
                    `support` agent only. No such flag means the skill is offered as usual.

Cost on the request path: every flag lives in one cache entry (FLAGS_CACHE_KEY) read with
agentplatform.cache.cache_get_many, so a turn costs one cache round trip and no query in
steady state. Saving or deleting a flag drops the entry (governance.flag_signals), on every
worker since the cache is shared; the entry also expires after AGENT_CACHE_SECONDS, which
bounds staleness after writes that bypass signals (queryset.update, raw SQL).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterable, Protocol

from django.conf import settings
from django.core.cache import cache

from agentplatform.cache import cache_get_many
from agentplatform.db import run_db
from agentplatform.errors import PermissionDenied

from .flag_signals import FLAGS_CACHE_KEY  # also connects the cache invalidation on save/delete
from .models import FeatureFlag

if TYPE_CHECKING:
    from agents.pipeline import ChatTurn

STREAMING_FLAG = "streaming"
SKILL_FLAG_PREFIX = "skill."


class StreamingDisabled(PermissionDenied):
    code = "streaming_disabled"
    message = "Streaming is switched off for this API key or agent: send the request without `stream: true`."


class _FlagLike(Protocol):
    name: str
    enabled: bool
    rollout_percentage: int
    target_key_prefixes: Any
    target_roles: Any
    target_agents: Any


@dataclass(frozen=True)
class FlagSpec:
    """A flag as cached: plain data with FeatureFlag's field names."""

    name: str
    enabled: bool
    rollout_percentage: int
    target_key_prefixes: frozenset[str]
    target_roles: frozenset[str]
    target_agents: frozenset[str]

    @classmethod
    def from_model(cls, flag: FeatureFlag) -> "FlagSpec":
        return cls(name=flag.name, enabled=flag.enabled, rollout_percentage=flag.rollout_percentage,
                   target_key_prefixes=frozenset(flag.target_key_prefixes or ()),
                   target_roles=frozenset(flag.target_roles or ()),
                   target_agents=frozenset(flag.target_agents or ()))

    def as_entry(self) -> list:
        return [self.enabled, self.rollout_percentage, sorted(self.target_key_prefixes),
                sorted(self.target_roles), sorted(self.target_agents)]

    @classmethod
    def from_entry(cls, name: str, entry: list) -> "FlagSpec":
        enabled, rollout, prefixes, roles, agents = entry
        return cls(name=name, enabled=enabled, rollout_percentage=rollout, target_key_prefixes=frozenset(prefixes),
                   target_roles=frozenset(roles), target_agents=frozenset(agents))


def rollout_bucket(flag_name: str, key_prefix: str | None) -> int:
    """The caller's bucket 0..99 for this flag: stable per key, independent between flags."""
    digest = hashlib.sha256(f"{flag_name}:{key_prefix or ''}".encode()).hexdigest()
    return int(digest[:8], 16) % 100


def flag_enabled(flag: _FlagLike, *, key_prefix: str | None, role: str | None, agent_name: str | None) -> bool:
    """Whether `flag` (a FeatureFlag or a FlagSpec) is on for this caller; see the module docstring."""
    if not flag.enabled:
        return False
    if ((key_prefix and key_prefix in flag.target_key_prefixes) or (role and role in flag.target_roles)
            or (agent_name and agent_name in flag.target_agents)):
        return True
    rollout = flag.rollout_percentage
    if rollout >= 100:
        return True
    if rollout <= 0:
        return False
    return rollout_bucket(flag.name, key_prefix) < rollout


def evaluate_flags(flags: Iterable[_FlagLike], *, key_prefix: str | None, role: str | None,
                   agent_name: str | None) -> dict[str, bool]:
    return {f.name: flag_enabled(f, key_prefix=key_prefix, role=role, agent_name=agent_name) for f in flags}


# --- the cached set of all flags -----------------------------------------------------------


def _load_flags() -> dict[str, FlagSpec]:
    flags = {f.name: FlagSpec.from_model(f) for f in FeatureFlag.objects.all()}
    # Wrapped in a dict so that "no flags at all" is a cached value too, not a miss.
    cache.set(FLAGS_CACHE_KEY, {"flags": {name: spec.as_entry() for name, spec in flags.items()}},
              settings.AGENT_CACHE_SECONDS)
    return flags


def _from_cached(entry: dict) -> dict[str, FlagSpec]:
    return {name: FlagSpec.from_entry(name, value) for name, value in entry["flags"].items()}


def all_flags() -> dict[str, FlagSpec]:
    """Every flag by name (sync: views, admin, commands)."""
    entry = cache.get(FLAGS_CACHE_KEY)
    return _from_cached(entry) if entry is not None else _load_flags()


async def all_flags_async() -> dict[str, FlagSpec]:
    """Every flag by name for the chat path: one cache round trip, a query only on a miss."""
    entry = (await cache_get_many([FLAGS_CACHE_KEY])).get(FLAGS_CACHE_KEY)
    if entry is not None:
        return _from_cached(entry)
    return await run_db(_load_flags)


def forget_flags() -> None:
    cache.delete(FLAGS_CACHE_KEY)


# --- the pipeline stage ----------------------------------------------------------------------


class FeatureFlagStage:
    """Applies the `streaming` and `skill.<name>` flags to a turn (see the module docstring).

    Notes `turn.notes["flags"]`: the evaluated platform flags that changed something
    ({"streaming": False} or {"skill.calculator": False}), for the stages after it.
    """

    async def before(self, turn: "ChatTurn") -> None:
        flags = await all_flags_async()
        if not flags:
            return
        principal = turn.principal
        caller = {"key_prefix": principal.prefix if principal else None, "role": principal.role if principal else None,
                  "agent_name": turn.agent.name}
        applied: dict[str, bool] = {}
        streaming = flags.get(STREAMING_FLAG)
        if turn.stream and streaming is not None and not flag_enabled(streaming, **caller):
            turn.notes["flags"] = {STREAMING_FLAG: False}
            raise StreamingDisabled()
        kept = []
        for skill in turn.skills:
            name = SKILL_FLAG_PREFIX + skill.name
            flag = flags.get(name)
            if flag is not None and not flag_enabled(flag, **caller):
                applied[name] = False
                continue
            kept.append(skill)
        if applied:
            turn.skills = tuple(kept)
            turn.notes["flags"] = applied

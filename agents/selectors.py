"""Reads: agents as the runtime sees them (AgentSpec), resolved by name through the shared cache.

An agent saved in the admin drops its cache entry (agents.signals), so the next request on
any worker reads the new version: dynamic agents without a restart. Unknown names are cached
as misses too (so a flood of bad names costs no queries); creating that agent drops the miss.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from decimal import Decimal

from django.conf import settings
from django.core.cache import cache
from django.db.models import Count, Prefetch, QuerySet, Sum

from .models import Agent, AgentSkill, Message, Run, Session
from .skills.base import SkillSpec

_MISSING = {"missing": True}
# Misses live shorter than hits: a name created by a migration or raw SQL shows up soon.
MISS_SECONDS = 30


@dataclass(frozen=True)
class AgentSpec:
    id: int
    name: str
    description: str
    model: str
    system_prompt: str
    temperature: float
    max_tokens: int
    fallback_models: tuple[str, ...]
    timeout_seconds: int
    enabled: bool
    skills: tuple[SkillSpec, ...] = field(default=())
    metadata: dict = field(default_factory=dict)
    rate_limit_rpm: int | None = None
    mask_transcripts: bool = False
    block_prompt_injection: bool = False
    max_retries: int | None = None  # None: settings.LLM_MAX_RETRIES
    # Request-scoped, never cached: the entries the pipeline stages asked for (their
    # `cache_keys` hook), read in the same cache round trip as this spec (None: a miss).
    cached: dict = field(default_factory=dict, compare=False, repr=False)

    def as_dict(self) -> dict:
        return {"id": self.id, "name": self.name, "description": self.description, "model": self.model,
                "system_prompt": self.system_prompt, "temperature": self.temperature,
                "max_tokens": self.max_tokens, "fallback_models": list(self.fallback_models),
                "timeout_seconds": self.timeout_seconds, "enabled": self.enabled,
                "skills": [s.as_dict() for s in self.skills], "metadata": self.metadata,
                "rate_limit_rpm": self.rate_limit_rpm, "mask_transcripts": self.mask_transcripts,
                "block_prompt_injection": self.block_prompt_injection, "max_retries": self.max_retries}

    @classmethod
    def from_dict(cls, d: dict) -> "AgentSpec":
        return cls(id=d["id"], name=d["name"], description=d["description"], model=d["model"],
                   system_prompt=d["system_prompt"], temperature=d["temperature"], max_tokens=d["max_tokens"],
                   fallback_models=tuple(d["fallback_models"]), timeout_seconds=d["timeout_seconds"],
                   enabled=d["enabled"], skills=tuple(SkillSpec.from_dict(s) for s in d["skills"]),
                   metadata=d.get("metadata") or {}, rate_limit_rpm=d.get("rate_limit_rpm"),
                   mask_transcripts=bool(d.get("mask_transcripts")),
                   block_prompt_injection=bool(d.get("block_prompt_injection")), max_retries=d.get("max_retries"))


def agent_cache_key(name: str) -> str:
    return f"agent:{name}"


def agent_spec_from_model(agent: Agent) -> AgentSpec:
    links = agent.agent_skills.all()  # prefetched, ordered by position
    skills = tuple(
        SkillSpec(name=link.skill.name, description=link.skill.description, kind=link.skill.kind,
                  parameters=link.skill.parameters, config=link.skill.config)
        for link in links if link.skill.enabled
    )
    return AgentSpec(id=agent.pk, name=agent.name, description=agent.description, model=agent.model,
                     system_prompt=agent.system_prompt, temperature=agent.temperature, max_tokens=agent.max_tokens,
                     fallback_models=tuple(agent.fallback_models or ()), timeout_seconds=agent.timeout_seconds,
                     enabled=agent.enabled, skills=skills, metadata=agent.metadata or {},
                     rate_limit_rpm=agent.rate_limit_rpm, mask_transcripts=agent.mask_transcripts,
                     block_prompt_injection=agent.block_prompt_injection, max_retries=agent.max_retries)


def agents_with_skills():
    return Agent.objects.prefetch_related(
        Prefetch("agent_skills", queryset=AgentSkill.objects.select_related("skill").order_by("position", "id")))


def visible_agents(principal):
    """The enabled agents a key may use, with their skills."""
    queryset = agents_with_skills().filter(enabled=True)
    if principal.agents is not None:
        queryset = queryset.filter(name__in=principal.agents)
    return queryset


def agent_entry_from_db(name: str) -> dict:
    """Load an agent and store its cache entry (a miss marker when there is none)."""
    agent = agents_with_skills().filter(name=name).first()
    if agent is None:
        cache.set(agent_cache_key(name), _MISSING, MISS_SECONDS)
        return _MISSING
    entry = agent_spec_from_model(agent).as_dict()
    cache.set(agent_cache_key(name), entry, settings.AGENT_CACHE_SECONDS)
    return entry


def agent_spec_from_entry(entry: dict | None) -> AgentSpec | None:
    if not entry or entry.get("missing"):
        return None
    return AgentSpec.from_dict(entry)


def agent_spec(name: str) -> AgentSpec | None:
    """Sync lookup (views, commands): the cached spec or None when there is no such agent."""
    entry = cache.get(agent_cache_key(name))
    if entry is None:
        entry = agent_entry_from_db(name)
    return agent_spec_from_entry(entry)


def session_continues(session: Session, *, agent_id: int, principal, user_id: int | None = None) -> bool:
    """Whether a turn of this caller may continue this session: the same agent, and the session
    is the caller's (its key's; a staff user's own) or the caller has an admin key."""
    if session.agent_id != agent_id:
        return False
    if principal is not None:
        return principal.is_admin or session.api_key_id == principal.key_id
    return session.user_id == user_id


def session_history(*, session: Session, limit: int) -> list[dict]:
    """The last `limit` messages of a session as Chat Completions messages, oldest first."""
    rows = list(Message.objects.filter(session=session).order_by("-created_at", "-id")[:limit])
    rows.reverse()
    # Never start the history with tool results cut off from the assistant call they answer.
    while rows and rows[0].role == Message.Role.TOOL:
        rows.pop(0)
    history: list[dict] = []
    for row in rows:
        if row.role == Message.Role.ASSISTANT and row.tool_calls:
            history.append({"role": "assistant", "content": row.content or None, "tool_calls": [
                {"id": tc["id"], "type": "function", "function": {"name": tc["name"], "arguments": tc["arguments"]}}
                for tc in row.tool_calls]})
        elif row.role == Message.Role.TOOL:
            history.append({"role": "tool", "tool_call_id": row.tool_call_id, "name": row.name, "content": row.content})
        else:
            history.append({"role": row.role, "content": row.content})
    return history


# --- runs as billed -----------------------------------------------------------------------

USD_PLACES = Decimal("0.00000001")


def usd_text(value: Decimal | None) -> str | None:
    """A cost as the API shows it: 8 places, as UsageRecord stores it and the `done` frame sends
    it (SQLite's SUM has more)."""
    return str(Decimal(value).quantize(USD_PLACES)) if value is not None else None


def runs_with_usage(queryset: QuerySet) -> QuerySet:
    """Runs annotated with what their usage records bill (through the reverse relation, so the
    agents app needs no import of billing): cost_usd, metered_calls, metered_*_tokens."""
    return queryset.annotate(cost_usd=Sum("usage__cost_usd"), metered_calls=Count("usage"),
                             metered_prompt_tokens=Sum("usage__prompt_tokens"),
                             metered_completion_tokens=Sum("usage__completion_tokens"))


def run_usage(run: Run) -> dict:
    """Tokens as billed when the run was metered (a run annotated by runs_with_usage): a cancelled
    run stores the tokens its model reported (none for a call cut short), metering estimates the
    call in flight (as the `done` frame of a cancelled turn reports them); an unmetered run (still
    queued or running) its own counts."""
    if getattr(run, "metered_calls", 0):
        prompt, completion = run.metered_prompt_tokens or 0, run.metered_completion_tokens or 0
    else:
        prompt, completion = run.prompt_tokens, run.completion_tokens
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

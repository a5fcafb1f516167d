"""Reads: the running experiment of an agent as the chat path sees it (one cache entry per
agent, a miss marker when none runs), and the runs an experiment served, for its results.

The chat path reads the entry in the pipeline's one cache round trip for the key and the agent
(the stage's `cache_keys`, agents.pipeline.principal_and_agent) and no query in steady state; a save of the experiment or of a variant drops it (experiments.signals),
so the next request on every worker reads the new weights. Entries also expire after
AGENT_CACHE_SECONDS, bounding staleness after writes that bypass signals (queryset.update).
"""

from __future__ import annotations

from django.conf import settings
from django.core.cache import cache
from django.db import transaction

from agents.models import Skill
from agents.skills.base import SkillSpec

from .models import Experiment, Variant

def experiment_cache_key(agent_name: str) -> str:
    """By name: the pipeline reads it with the agent's own entry, before it knows the agent's id
    (entries carry `agent_id`, so one left by a renamed agent is never taken for another's)."""
    return f"experiment:agent:{agent_name}"


def forget_experiment_of(*agent_names: str | None) -> None:
    keys = [experiment_cache_key(n) for n in agent_names if n]
    if keys:
        cache.delete_many(keys)
        transaction.on_commit(lambda: cache.delete_many(keys))


def variant_entry(variant: Variant, skills: dict[str, dict]) -> dict:
    overrides = variant.overrides()
    names = overrides.pop("skills", None)
    entry = {"name": variant.name, "weight": variant.weight, "control": variant.is_control, "overrides": overrides}
    if names is not None:
        # Resolved now, so applying the variant needs no query; unknown or disabled ones are dropped.
        entry["skills"] = [skills[n] for n in names if n in skills]
    return entry


def experiment_entry(experiment: Experiment, variants: list[Variant]) -> dict:
    names = {n for v in variants for n in (v.skills or ()) if not v.is_control}
    skills = {s.name: SkillSpec(name=s.name, description=s.description, kind=s.kind, parameters=s.parameters,
                                config=s.config).as_dict()
              for s in Skill.objects.filter(name__in=names, enabled=True)} if names else {}
    by_id = {v.id: v for v in variants}
    shadow = by_id.get(experiment.shadow_variant_id)
    return {"id": experiment.id, "name": experiment.name, "flag": experiment.flag,
            "variants": [variant_entry(v, skills) for v in variants if v.weight > 0 or v.is_control],
            "shadow": ({"variant": variant_entry(shadow, skills), "percent": experiment.shadow_percent}
                       if shadow is not None and experiment.shadow_percent > 0 else None)}


def running_experiment_entry_from_db(agent_id: int, agent_name: str) -> dict:
    """Load the agent's running experiment and cache its entry (a marker when there is none)."""
    experiment = Experiment.objects.filter(agent_id=agent_id, status=Experiment.Status.RUNNING).first()
    entry = ({"none": True} if experiment is None else experiment_entry(experiment, list(experiment.variants.all())))
    entry["agent_id"] = agent_id
    cache.set(experiment_cache_key(agent_name), entry, settings.AGENT_CACHE_SECONDS)
    return entry


def entry_for(entry: dict | None, agent_id: int) -> dict | None:
    """The entry if it is this agent's (None: a miss, or another agent's under a reused name)."""
    return entry if entry is not None and entry.get("agent_id") == agent_id else None


def entry_running(entry: dict | None) -> bool:
    return bool(entry) and not entry.get("none")

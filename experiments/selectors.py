"""Reads: the running experiment of an agent as the chat path sees it (one cache entry per
agent, a miss marker when none runs), and the runs an experiment served, for its results.

The chat path reads the entry with one cache round trip (agentplatform.cache.cache_get_many) and
no query in steady state; a save of the experiment or of a variant drops it (experiments.signals),
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

_NONE = {"none": True}


def experiment_cache_key(agent_id: int) -> str:
    return f"experiment:agent:{agent_id}"


def forget_experiment_of(agent_id: int) -> None:
    key = experiment_cache_key(agent_id)
    cache.delete(key)
    transaction.on_commit(lambda: cache.delete(key))


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


def running_experiment_entry_from_db(agent_id: int) -> dict:
    """Load the agent's running experiment and cache its entry (a marker when there is none)."""
    experiment = Experiment.objects.filter(agent_id=agent_id, status=Experiment.Status.RUNNING).first()
    entry = _NONE if experiment is None else experiment_entry(experiment, list(experiment.variants.all()))
    cache.set(experiment_cache_key(agent_id), entry, settings.AGENT_CACHE_SECONDS)
    return entry


def entry_running(entry: dict | None) -> bool:
    return bool(entry) and not entry.get("none")

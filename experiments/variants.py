"""A variant's configuration applied to an agent's: the one place a variant's overrides become
the AgentSpec a turn (experiments.stages) or a shadow run (experiments.shadow) runs with."""

from __future__ import annotations

import dataclasses

from agents.selectors import AgentSpec
from agents.skills.base import SkillSpec


def variant_spec(agent: AgentSpec, variant: dict) -> AgentSpec:
    """The agent as the variant (a cache entry's variant) configures it."""
    changes = dict(variant.get("overrides") or {})
    if "fallback_models" in changes:
        changes["fallback_models"] = tuple(changes["fallback_models"])
    if "skills" in variant:
        changes["skills"] = tuple(SkillSpec.from_dict(s) for s in variant["skills"])
    return dataclasses.replace(agent, **changes) if changes else agent

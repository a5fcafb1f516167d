"""The authenticated caller, as cached: plain data, no model instance, no query to use it."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Principal:
    key_id: int
    prefix: str
    name: str
    role: str
    # Names of the agents this key may call; None means all agents, an empty set none.
    agents: frozenset[str] | None
    # Names of the skills this key may have offered to the model; None means all, empty none.
    skills: frozenset[str] | None = None
    rate_limit_rpm: int | None = None
    rate_limit_tpm: int | None = None

    # DRF treats request.user as authenticated when it says so.
    is_authenticated = True

    @property
    def is_admin(self) -> bool:
        return self.role == "admin"

    def may_use_agent(self, agent_name: str) -> bool:
        return self.agents is None or agent_name in self.agents

    def may_use_skill(self, skill_name: str) -> bool:
        return self.skills is None or skill_name in self.skills

    @property
    def actor(self) -> str:
        """How audit entries name this caller."""
        return f"key:{self.prefix}"

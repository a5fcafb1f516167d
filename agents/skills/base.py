"""The skill interface: what the runtime offers the model as tools and how a call is executed.

A skill is resolved into a SkillSpec (plain data, cacheable with its agent). The runtime turns
each spec into an OpenAI `tools` entry with `tool_definition` and runs a call with
`skill_execute`, which never raises for a bad call: the model gets the error text as the
tool's result and may try again, as with any tool.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Awaitable, Callable, Protocol


@dataclass(frozen=True)
class SkillSpec:
    name: str
    description: str
    kind: str  # "builtin" | "http"
    parameters: dict = field(default_factory=dict)
    config: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        return {"name": self.name, "description": self.description, "kind": self.kind,
                "parameters": self.parameters, "config": self.config}

    @classmethod
    def from_dict(cls, data: dict) -> "SkillSpec":
        return cls(name=data["name"], description=data.get("description", ""), kind=data.get("kind", "builtin"),
                   parameters=data.get("parameters") or {}, config=data.get("config") or {})


@dataclass(frozen=True)
class SkillContext:
    """What a skill may know about the call: whose agent, which request."""

    agent_id: int
    agent_name: str
    request_id: str | None = None


class SkillError(Exception):
    """A skill call that failed in a way the model should hear about (bad arguments, host not allowed...)."""


class BuiltinSkill(Protocol):
    name: str
    description: str
    parameters: dict

    async def run(self, arguments: dict, *, config: dict, context: SkillContext) -> str: ...


@dataclass(frozen=True)
class ToolResult:
    content: str
    is_error: bool = False


def parse_arguments(raw: str | dict | None) -> dict:
    if raw is None or raw == "":
        return {}
    if isinstance(raw, dict):
        return raw
    try:
        value = json.loads(raw)
    except (TypeError, ValueError) as exc:
        raise SkillError(f"arguments are not valid JSON: {exc}") from exc
    if not isinstance(value, dict):
        raise SkillError("arguments must be a JSON object")
    return value


def tool_definition(spec: SkillSpec) -> dict:
    """The OpenAI Chat Completions `tools` entry for a skill."""
    parameters = spec.parameters or {"type": "object", "properties": {}}
    return {"type": "function", "function": {"name": spec.name, "description": spec.description,
                                             "parameters": parameters}}


Runner = Callable[[dict], Awaitable[str]]

"""Built-in skills and the executor the runtime calls for every tool call.

`skill_execute` never raises (cancellation aside): a bad call, a refused URL, a timeout or
a bug in a skill all come back as an error ToolResult, which the model reads as the tool's
answer and may act on. Unexpected failures are logged with the skill's name and the
caller, never with the arguments or config, which may carry secrets.
"""

from __future__ import annotations

import asyncio
import copy
import logging

from agents.skills.base import (
    BuiltinSkill,
    SkillContext,
    SkillError,
    SkillSpec,
    ToolResult,
    parse_arguments,
    tool_definition,
)
from agents.skills.calculator import Calculator
from agents.skills.current_time import CurrentTime
from agents.skills.http_fetch import HttpFetch
from agents.skills.http_skill import http_skill_run
from agents.skills.knowledge_search import KnowledgeSearch

__all__ = [
    "BUILTINS",
    "BuiltinSkill",
    "SkillContext",
    "SkillError",
    "SkillSpec",
    "ToolResult",
    "builtin_skill_defaults",
    "parse_arguments",
    "skill_execute",
    "tool_definition",
]

logger = logging.getLogger("agents.skills")

BUILTINS: dict[str, BuiltinSkill] = {
    skill.name: skill for skill in (Calculator(), CurrentTime(), HttpFetch(), KnowledgeSearch())
}

# Backstop over every call. The network skills enforce their own deadline (30 s at most);
# this catches anything that would otherwise hang the run.
SKILL_TIMEOUT_SECONDS = 60.0


def builtin_skill_defaults(name: str) -> dict:
    """Description and parameters schema of a built-in, for seeding its Skill row. KeyError if unknown."""
    skill = BUILTINS[name]
    return {"description": skill.description, "parameters": copy.deepcopy(skill.parameters)}


def _error(message: str) -> ToolResult:
    return ToolResult(content=f"error: {message}", is_error=True)


async def _dispatch(skill: SkillSpec, arguments: dict, context: SkillContext) -> str:
    if skill.kind == "builtin":
        implementation = BUILTINS.get(skill.name)
        if implementation is None:
            raise SkillError(f"unknown built-in skill {skill.name!r}")
        return await implementation.run(arguments, config=dict(skill.config or {}), context=context)
    if skill.kind == "http":
        return await http_skill_run(skill=skill, arguments=arguments, context=context)
    raise SkillError(f"unsupported skill kind {skill.kind!r}")


async def skill_execute(*, skill: SkillSpec, arguments: str | dict | None, context: SkillContext) -> ToolResult:
    """Run one tool call; errors come back as ToolResult(is_error=True), never as exceptions."""
    try:
        parsed = parse_arguments(arguments)
        async with asyncio.timeout(SKILL_TIMEOUT_SECONDS):
            content = await _dispatch(skill, parsed, context)
    except SkillError as exc:
        return _error(str(exc))
    except TimeoutError:
        # The backstop above, or a socket timeout a skill did not turn into a SkillError.
        return _error(f"{skill.name} timed out")
    except Exception:
        logger.exception("skill %s (%s) failed: agent=%s request_id=%s",
                         skill.name, skill.kind, context.agent_id, context.request_id)
        return _error(f"{skill.name} failed unexpectedly")
    if not isinstance(content, str):
        content = str(content)
    return ToolResult(content=content)

"""The agent runtime: one model-and-tools loop that every transport consumes as events.

    delta        {"content"}                       text as the model produces it
    tool_call    {"id", "name", "arguments"}       the model asked for a skill
    tool_result  {"id", "name", "content", "is_error"}
    usage        {"prompt_tokens", "completion_tokens", "total_tokens"}  totals of the run
    done         {"output", "model", "finish_reason"}
    error        {"code", "message", "status"}

The loop: call the model with the agent's skills as tools; run the calls it makes (in
parallel), append their results, call again; at most AGENT_MAX_STEPS calls, the last one
without tools so it has to answer. A failed call falls back to the agent's next model as
long as nothing of that call's answer was sent yet. The AgentRun object keeps what the
pipeline persists (output, messages produced, per-call usage), also when the consumer stops
early (client gone, cancel).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import AsyncIterator

from django.conf import settings

from agentplatform.errors import PlatformError

from .providers import Completion, ModelCall, ProviderError, TextDelta, Usage, provider_for
from .selectors import AgentSpec
from .skills import skill_execute
from .skills.base import SkillContext, tool_definition


@dataclass
class CallRecord:
    """One model call, for metering: which model, what it cost in tokens, whether it answered."""

    model: str
    usage: Usage
    ok: bool
    error_code: str = ""
    latency_ms: int = 0


@dataclass
class AgentRun:
    agent: AgentSpec
    messages: list[dict]
    stream: bool
    request_id: str | None = None
    max_steps: int = 0
    temperature: float | None = None
    max_tokens: int | None = None
    # The skills offered to the model (the agent's, narrowed by the key and flags); None: all.
    skills: tuple | None = None
    # Filled while running:
    output: str = ""
    model: str = ""
    finish_reason: str = ""
    usage: Usage = field(default_factory=Usage)
    calls: list[CallRecord] = field(default_factory=list)
    tool_calls: list[dict] = field(default_factory=list)
    # Messages the run added to the conversation (assistant, tool), in order, for the transcript.
    produced: list[dict] = field(default_factory=list)
    error: PlatformError | None = None
    finished: bool = False
    _pending_text: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.max_steps = self.max_steps or settings.AGENT_MAX_STEPS

    @property
    def steps(self) -> int:
        return len(self.calls)

    @property
    def partial_output(self) -> str:
        """What was produced so far, including an answer cut off mid-stream."""
        return self.output + "".join(self._pending_text)

    async def events(self) -> AsyncIterator[dict]:
        agent = self.agent
        offered = agent.skills if self.skills is None else self.skills
        tools = [tool_definition(s) for s in offered] or None
        skills = {s.name: s for s in offered}
        context = SkillContext(agent_id=agent.id, agent_name=agent.name, request_id=self.request_id)
        conversation = list(self.messages)
        models = [agent.model, *agent.fallback_models]
        model_index = 0
        for step in range(self.max_steps):
            last_step = step == self.max_steps - 1
            completion: Completion | None = None
            while completion is None:
                model = models[model_index]
                call = ModelCall(model="", messages=conversation, tools=None if last_step else tools,
                                 temperature=self.temperature if self.temperature is not None else agent.temperature,
                                 max_tokens=self.max_tokens or agent.max_tokens, timeout=float(agent.timeout_seconds))
                started = time.perf_counter()
                sent_any = False
                try:
                    provider, name = provider_for(model)
                    call = ModelCall(**{**call.__dict__, "model": name})
                    if self.stream:
                        async for part in provider.stream(call):
                            if isinstance(part, TextDelta):
                                sent_any = True
                                self._pending_text.append(part.content)
                                yield {"type": "delta", "content": part.content}
                            else:
                                completion = part
                    else:
                        completion = await asyncio.wait_for(provider.complete(call), agent.timeout_seconds + 1)
                except (ProviderError, asyncio.TimeoutError) as exc:
                    err = exc if isinstance(exc, ProviderError) else ProviderError(
                        "The model provider did not answer in time.", code="upstream_timeout", http_status=504)
                    # A call the upstream accepted costs what it produced (a cut stream: estimated).
                    usage = err.usage or Usage(0, 0)
                    self.calls.append(CallRecord(model=model, usage=usage, ok=False, error_code=err.code,
                                                 latency_ms=int((time.perf_counter() - started) * 1000)))
                    self.usage.add(usage)
                    # Part of the answer is out already: another model cannot take it back.
                    if sent_any or model_index + 1 >= len(models):
                        self.error = err
                        yield self._error_event(err)
                        return
                    model_index += 1
                    continue
                self._pending_text.clear()
                self.calls.append(CallRecord(model=model, usage=completion.usage, ok=True,
                                             latency_ms=int((time.perf_counter() - started) * 1000)))
                self.usage.add(completion.usage)
                self.model = model
            if not self.stream and completion.content:
                yield {"type": "delta", "content": completion.content}
            if completion.content:
                self.output += completion.content
            if not completion.tool_calls:
                self.produced.append({"role": "assistant", "content": completion.content})
                self.finish_reason = completion.finish_reason or "stop"
                break
            calls = completion.tool_calls
            self.produced.append({"role": "assistant", "content": completion.content,
                                  "tool_calls": [tc.as_dict() for tc in calls]})
            conversation.append({"role": "assistant", "content": completion.content or None, "tool_calls": [
                {"id": tc.id, "type": "function", "function": {"name": tc.name, "arguments": tc.arguments}}
                for tc in calls]})
            for tc in calls:
                yield {"type": "tool_call", "id": tc.id, "name": tc.name, "arguments": tc.arguments}
            results = await asyncio.gather(*(
                skill_execute(skill=skills[tc.name], arguments=tc.arguments, context=context) if tc.name in skills
                else _unknown_tool(tc.name) for tc in calls))
            for tc, result in zip(calls, results):
                record = {"id": tc.id, "name": tc.name, "arguments": tc.arguments, "result": result.content,
                          "is_error": result.is_error}
                self.tool_calls.append(record)
                self.produced.append({"role": "tool", "tool_call_id": tc.id, "name": tc.name, "content": result.content})
                conversation.append({"role": "tool", "tool_call_id": tc.id, "content": result.content})
                yield {"type": "tool_result", "id": tc.id, "name": tc.name, "content": result.content,
                       "is_error": result.is_error}
        self.finished = True
        yield {"type": "usage", **self.usage.as_dict()}
        yield {"type": "done", "output": self.output, "model": self.model, "finish_reason": self.finish_reason}

    @staticmethod
    def _error_event(err: PlatformError) -> dict:
        return {"type": "error", "code": err.code, "message": err.message, "status": err.http_status}


async def _unknown_tool(name: str):
    from .skills.base import ToolResult

    return ToolResult(content=f"error: no skill named {name!r} is available to this agent", is_error=True)

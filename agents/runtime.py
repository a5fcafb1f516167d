"""The agent runtime: one model-and-tools loop that every transport consumes as events.

    delta        {"content"}                       text as the model produces it
    tool_call    {"id", "name", "arguments"}       the model asked for a skill
    tool_result  {"id", "name", "content", "is_error"}
    usage        {"prompt_tokens", "completion_tokens", "total_tokens"}  totals of the run
    done         {"output", "model", "finish_reason"}
    error        {"code", "message", "status"}

The loop: call the model with the agent's skills as tools; run the calls it makes (in
parallel), append their results, call again; at most AGENT_MAX_STEPS calls, the last one
without tools so it has to answer. A failed call is retried with backoff when its error is
transient, then falls back to the agent's next model, as long as nothing of that call's answer
was sent yet; a model whose circuit is open is skipped without a call; the agent's
timeout_seconds bounds the whole run (agents.resilience has the rules). Every attempt is a call
of its own in `calls` (metered, failed ones included). The AgentRun object keeps what the
pipeline persists (output, messages produced, per-call usage), also when the consumer stops
early (client gone, cancel).
"""

from __future__ import annotations

import asyncio
import time
from contextlib import aclosing
from dataclasses import dataclass, field, replace
from typing import AsyncIterator

from django.conf import settings

from agentplatform.circuit import ALLOWED, circuit_acquire, circuit_failure, circuit_success
from agentplatform.errors import PlatformError

from .providers import Completion, ModelCall, ProviderError, TextDelta, Usage, provider_for
from .providers.base import ProviderTimeout
from .resilience import (
    Deadline,
    RunTimeout,
    circuit_open_error,
    counts_against_circuit,
    max_retries,
    retry_delay,
)
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
    # The model being called (or last called, or skipped: its circuit open): what a run that
    # ended before any model answered is recorded with, and what its call in flight is billed as.
    model_in_flight: str = ""
    deadline: Deadline | None = None
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
        retries_allowed = max_retries(agent)
        deadline = self.deadline = Deadline(float(agent.timeout_seconds))
        # A run's failures of one model count once against its circuit: its retries are the same
        # request failing again, not more evidence that the model is down (otherwise one request
        # with a fault of its own, retried, trips the circuit for every caller).
        counted: set[str] = set()
        for step in range(self.max_steps):
            last_step = step == self.max_steps - 1
            completion: Completion | None = None
            retries = 0  # made on models[model_index] in this step
            while True:
                model = models[model_index]
                self.model_in_flight = model
                failure: PlatformError | None = None
                sent_any = opened = False
                permit = ALLOWED
                if deadline.expired:
                    failure = deadline.error()
                else:
                    permit = await circuit_acquire(model, lease_seconds=deadline.remaining())
                    if not permit.allowed:
                        failure = circuit_open_error(model, permit.retry_after)
                if failure is None:
                    call = ModelCall(model="", messages=conversation, tools=None if last_step else tools,
                                     temperature=agent.temperature if self.temperature is None else self.temperature,
                                     max_tokens=self.max_tokens or agent.max_tokens)
                    started = time.perf_counter()
                    try:
                        async with aclosing(self._attempt(model, call, deadline)) as parts:
                            async for part in parts:
                                if isinstance(part, TextDelta):
                                    sent_any = True
                                    self._pending_text.append(part.content)
                                    yield {"type": "delta", "content": part.content}
                                else:
                                    completion = part
                    except ProviderError as exc:
                        failure = exc
                    except TimeoutError:  # the run's deadline (_attempt's own limits raise ProviderTimeout)
                        failure = deadline.error()
                    latency_ms = int((time.perf_counter() - started) * 1000)
                    if failure is None:
                        await circuit_success(model, permit)
                    else:
                        completion = None
                        # A call the upstream accepted costs what it produced (a cut stream: estimated).
                        usage = getattr(failure, "usage", None) or Usage(0, 0)
                        self.calls.append(CallRecord(model=model, usage=usage, ok=False,
                                                     error_code=failure.code, latency_ms=latency_ms))
                        self.usage.add(usage)
                        if isinstance(failure, RunTimeout) or counts_against_circuit(failure):
                            if model not in counted or permit.probe:
                                counted.add(model)
                                opened = await circuit_failure(model)
                        elif getattr(failure, "upstream_status", None) is not None:
                            # The model answered (a 4xx the request caused): it is up.
                            await circuit_success(model, permit)
                if failure is None:
                    assert completion is not None
                    self._pending_text.clear()
                    self.calls.append(CallRecord(model=model, usage=completion.usage, ok=True, latency_ms=latency_ms))
                    self.usage.add(completion.usage)
                    self.model = model
                    break
                # Part of the answer is out already: neither a retry nor another model can take it
                # back. Past the deadline, nothing is tried any more.
                if sent_any or isinstance(failure, RunTimeout) or deadline.expired:
                    yield self._fail(deadline.error() if deadline.expired else failure)
                    return
                if permit.allowed and not opened and retries < retries_allowed:
                    delay = retry_delay(failure, retries, deadline.remaining())
                    if delay is not None:
                        retries += 1
                        await asyncio.sleep(delay)
                        continue
                if model_index + 1 >= len(models):
                    yield self._fail(failure)
                    return
                model_index += 1
                retries = 0
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
            try:
                async with asyncio.timeout(deadline.remaining()):
                    results = await asyncio.gather(*(
                        skill_execute(skill=skills[tc.name], arguments=tc.arguments, context=context)
                        if tc.name in skills else _unknown_tool(tc.name) for tc in calls))
            except TimeoutError:
                yield self._fail(deadline.error())
                return
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

    def _fail(self, err: PlatformError) -> dict:
        """End the run with `err`: its `error` event."""
        self.error = err
        return {"type": "error", "code": err.code, "message": err.message, "status": err.http_status}

    async def _attempt(self, model: str, call: ModelCall, deadline: Deadline) -> AsyncIterator[TextDelta | Completion]:
        """One call of `model`: its parts (text deltas when streaming, then the Completion),
        each awaited within the run's deadline (TimeoutError) and a stream's first-token and
        idle limits (ProviderTimeout). No part is yielded inside a timeout scope: the consumer's
        time between parts must not be cancelled by it."""
        provider, name = provider_for(model)
        # The SDK's own timeout sits just past the deadline, so that the deadline fires first.
        call = replace(call, model=name, timeout=deadline.remaining() + 0.5)
        if not self.stream:
            async with asyncio.timeout(deadline.remaining()):
                completion = await provider.complete(call)
            yield completion
            return
        first_token, idle = settings.LLM_FIRST_TOKEN_TIMEOUT_SECONDS, settings.LLM_STREAM_IDLE_TIMEOUT_SECONDS
        got_one = False
        async with aclosing(provider.stream(call)) as stream:
            parts = aiter(stream)
            while True:
                gap = idle if got_one else first_token
                remaining = deadline.remaining()
                own_limit = 0 < gap < remaining
                try:
                    async with asyncio.timeout(gap if own_limit else remaining) as scope:
                        part = await anext(parts)
                except StopAsyncIteration:
                    return
                except TimeoutError:
                    if own_limit and scope.expired():
                        what = "sent nothing more" if got_one else "sent no first token"
                        raise ProviderTimeout(f"{provider.name} {what} within {gap:g} s.") from None
                    raise
                got_one = True
                yield part


async def _unknown_tool(name: str):
    from .skills.base import ToolResult

    return ToolResult(content=f"error: no skill named {name!r} is available to this agent", is_error=True)

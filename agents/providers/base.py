"""The provider interface: one base class, one subclass per backend, one error type.

A provider answers one model call: `complete` (whole answer) or `stream` (text deltas as they
come, then the whole answer). Tool calls and usage arrive in the final Completion either
way, so the runtime loop treats both alike.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import AsyncIterator

from agentplatform.errors import UpstreamError


@dataclass(frozen=True)
class ToolCall:
    id: str
    name: str
    arguments: str  # JSON text, as the model wrote it

    def as_dict(self) -> dict:
        return {"id": self.id, "name": self.name, "arguments": self.arguments}


@dataclass
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    # False when the upstream reported no usage and we counted ourselves.
    reported: bool = True

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def add(self, other: "Usage") -> None:
        self.prompt_tokens += other.prompt_tokens
        self.completion_tokens += other.completion_tokens
        self.reported = self.reported and other.reported

    def as_dict(self) -> dict:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.total_tokens}


@dataclass
class Completion:
    content: str = ""
    tool_calls: list[ToolCall] = field(default_factory=list)
    usage: Usage = field(default_factory=Usage)
    finish_reason: str = "stop"
    model: str = ""


@dataclass(frozen=True)
class ModelCall:
    """Everything a provider needs for one call. `model` is without the provider prefix."""

    model: str
    messages: list[dict]
    tools: list[dict] | None = None
    temperature: float | None = None
    max_tokens: int | None = None
    timeout: float = 60.0


@dataclass(frozen=True)
class TextDelta:
    content: str


class ProviderError(UpstreamError):
    """A failed model call. `permanent` says whether a retry of the same call could help.
    `usage`: what the failed call costs when the upstream had accepted it (a stream that broke
    after its 200: the prompt and what was produced, estimated unless the upstream reported
    it); None for a call the upstream refused or never answered, which costs nothing."""

    usage: Usage | None = None


class ProviderStreamCut(ProviderError):
    """A stream that ended before its answer was whole: neither a finish reason nor `[DONE]`
    arrived (the connection closed or was reset mid-body, the body ended early, its last event
    was cut off mid-JSON). Whatever it produced is no answer."""

    http_status = 502
    code = "upstream_stream_cut"
    message = "The model provider's stream broke off before the answer was complete."


class ProviderTimeout(ProviderError):
    http_status = 504
    code = "upstream_timeout"
    message = "The model provider did not answer in time."


class Provider:
    name: str = ""

    async def complete(self, call: ModelCall) -> Completion:
        raise NotImplementedError

    def stream(self, call: ModelCall) -> AsyncIterator[TextDelta | Completion]:
        """Yield TextDelta parts, then exactly one Completion (content, tool calls, usage)."""
        raise NotImplementedError

    async def aclose(self) -> None:
        """Release connections (tests and shutdown)."""


def estimate_tokens(text: str) -> int:
    """Offline token estimate (about 4 characters per token) for upstreams that report none."""
    return max(1, (len(text) + 3) // 4) if text else 0

"""OpenAI and every OpenAI-compatible server (vLLM, Ollama, LM Studio, gateways, Anthropic's
compatibility endpoint) through the official SDK's AsyncOpenAI client.

One client, hence one connection pool, per provider per process (per event loop, since an
httpx pool cannot move between loops; a server has one loop). Non-streaming calls go through the
SDK's raw `client.post` and read the JSON body instead of building its pydantic objects: same
request, same errors, less CPU on the hot path.
"""

from __future__ import annotations

import asyncio
import json
import math
from typing import Any, AsyncIterator

import httpx
import openai

from .base import Completion, ModelCall, Provider, ProviderError, ProviderTimeout, TextDelta, ToolCall, Usage, estimate_tokens


def _retry_after(exc: openai.APIStatusError) -> float | None:
    value = exc.response.headers.get("retry-after") if exc.response is not None else None
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None


def _upstream_message(exc: openai.APIStatusError) -> str:
    body = exc.body
    if isinstance(body, dict):
        inner = body.get("error", body)
        if isinstance(inner, dict) and inner.get("message"):
            return str(inner["message"])[:300]
    return str(exc.message)[:300]


def provider_error(exc: BaseException, provider: str) -> ProviderError:
    """Map SDK and transport exceptions to ProviderError (never leaking keys or bodies at length)."""
    if isinstance(exc, (openai.APITimeoutError, asyncio.TimeoutError, httpx.TimeoutException)):
        return ProviderTimeout(f"{provider} did not answer in time.")
    if isinstance(exc, openai.RateLimitError):
        # 503 + Retry-After: the platform is not limiting the caller, its upstream is; clients
        # (the OpenAI SDKs included) retry 503s after the delay.
        retry_after = _retry_after(exc)
        return ProviderError(f"{provider} is rate limiting us: {_upstream_message(exc)}", code="upstream_rate_limited",
                             retry_after=retry_after, upstream_status=429, http_status=503,
                             headers={"Retry-After": str(math.ceil(retry_after))} if retry_after else None)
    if isinstance(exc, openai.APIStatusError):
        status = exc.status_code
        permanent = 400 <= status < 500 and status not in (408, 409, 429)
        return ProviderError(f"{provider} answered {status}: {_upstream_message(exc)}", code="upstream_error",
                             permanent=permanent, upstream_status=status)
    if isinstance(exc, (openai.APIConnectionError, httpx.HTTPError)):
        return ProviderError(f"{provider} connection failed: {type(exc).__name__}", code="upstream_unavailable")
    if isinstance(exc, openai.APIError):
        return ProviderError(f"{provider} failed: {exc.message}"[:300], code="upstream_error")
    return ProviderError(f"{provider} failed: {type(exc).__name__}", code="upstream_error")


def _http_client() -> httpx.AsyncClient:
    """The SDK's aiohttp transport (openai[aiohttp]): the same SDK and wire protocol, with a
    connection pool that costs far less CPU per request than httpx's own under concurrency."""
    limits = httpx.Limits(max_connections=1000, max_keepalive_connections=100)
    try:
        return openai.DefaultAioHttpClient(limits=limits)
    except RuntimeError:  # httpx-aiohttp not installed
        return openai.DefaultAsyncHttpxClient(limits=limits)


class OpenAICompatibleProvider(Provider):
    def __init__(self, name: str, *, api_key: str, base_url: str | None) -> None:
        self.name = name
        self.api_key = api_key
        self.base_url = base_url
        self._clients: dict[int, openai.AsyncOpenAI] = {}

    def _client(self) -> openai.AsyncOpenAI:
        if not self.api_key:
            raise ProviderError(f"The {self.name} provider has no API key configured.",
                                code="provider_not_configured", permanent=True)
        loop_id = id(asyncio.get_running_loop())
        client = self._clients.get(loop_id)
        if client is None:
            # Retries are the runtime's job (fallback models), not the SDK's: an SDK retry
            # honouring Retry-After could hold a request for a minute.
            client = openai.AsyncOpenAI(api_key=self.api_key, base_url=self.base_url, max_retries=0,
                                        http_client=_http_client())
            self._clients = {loop_id: client}  # a process serves one loop; drop clients of dead loops
        return client

    @staticmethod
    def _kwargs(call: ModelCall) -> dict[str, Any]:
        kwargs: dict[str, Any] = {"model": call.model, "messages": call.messages, "timeout": call.timeout}
        if call.tools:
            kwargs["tools"] = call.tools
        if call.temperature is not None:
            kwargs["temperature"] = call.temperature
        if call.max_tokens:
            kwargs["max_tokens"] = call.max_tokens
        return kwargs

    async def complete(self, call: ModelCall) -> Completion:
        client = self._client()
        try:
            # client.post is the SDK's documented door for raw calls: its transport, auth,
            # error mapping and timeouts, without building typed request/response objects.
            kwargs = self._kwargs(call)
            timeout = kwargs.pop("timeout")
            raw = await client.post("/chat/completions", cast_to=httpx.Response, body=kwargs,
                                    options={"timeout": timeout})
            data = json.loads(raw.content)
        except (openai.APIError, httpx.HTTPError, asyncio.TimeoutError) as exc:
            raise provider_error(exc, self.name) from exc
        except ValueError as exc:
            raise ProviderError(f"{self.name} sent a body that is not JSON.", code="upstream_bad_response") from exc
        try:
            choice = data["choices"][0]
            message = choice.get("message") or {}
            tool_calls = [
                ToolCall(id=tc["id"], name=tc["function"]["name"], arguments=tc["function"].get("arguments") or "{}")
                for tc in message.get("tool_calls") or []
            ]
            content = message.get("content") or ""
            usage_data = data.get("usage")
        except (KeyError, IndexError, TypeError) as exc:
            raise ProviderError(f"{self.name} sent an unexpected response shape.", code="upstream_bad_response") from exc
        if usage_data:
            usage = Usage(int(usage_data.get("prompt_tokens") or 0), int(usage_data.get("completion_tokens") or 0))
        else:
            usage = _estimated_usage(call, content, tool_calls)
        return Completion(content=content, tool_calls=tool_calls, usage=usage,
                          finish_reason=choice.get("finish_reason") or "stop", model=data.get("model") or call.model)

    async def stream(self, call: ModelCall) -> AsyncIterator[TextDelta | Completion]:
        client = self._client()
        parts: list[str] = []
        calls: dict[int, dict] = {}
        usage: Usage | None = None
        finish_reason = "stop"
        model = call.model
        try:
            stream = await client.chat.completions.create(
                **self._kwargs(call), stream=True, stream_options={"include_usage": True})
            try:
                async for chunk in stream:
                    model = chunk.model or model
                    if chunk.usage is not None:
                        usage = Usage(chunk.usage.prompt_tokens or 0, chunk.usage.completion_tokens or 0)
                    for choice in chunk.choices:
                        delta = choice.delta
                        if delta.content:
                            parts.append(delta.content)
                            yield TextDelta(delta.content)
                        for tc in delta.tool_calls or []:
                            slot = calls.setdefault(tc.index, {"id": "", "name": "", "arguments": []})
                            if tc.id:
                                slot["id"] = tc.id
                            if tc.function is not None:
                                if tc.function.name:
                                    slot["name"] = tc.function.name
                                if tc.function.arguments:
                                    slot["arguments"].append(tc.function.arguments)
                        if choice.finish_reason:
                            finish_reason = choice.finish_reason
            finally:
                # Closing the stream closes the upstream response: a client that went away
                # stops the generation we pay for.
                await stream.close()
        except (openai.APIError, httpx.HTTPError, asyncio.TimeoutError) as exc:
            raise provider_error(exc, self.name) from exc
        tool_calls = [ToolCall(id=slot["id"] or f"call_{index}", name=slot["name"],
                               arguments="".join(slot["arguments"]) or "{}")
                      for index, slot in sorted(calls.items())]
        content = "".join(parts)
        if usage is None:
            usage = _estimated_usage(call, content, tool_calls)
        yield Completion(content=content, tool_calls=tool_calls, usage=usage, finish_reason=finish_reason, model=model)

    async def aclose(self) -> None:
        clients, self._clients = self._clients, {}
        for client in clients.values():
            await client.close()


def _estimated_usage(call: ModelCall, content: str, tool_calls: list[ToolCall]) -> Usage:
    prompt = sum(estimate_tokens(json.dumps(m.get("content") or "")) + 4 for m in call.messages)
    completion = estimate_tokens(content) + sum(estimate_tokens(tc.arguments) + 4 for tc in tool_calls)
    return Usage(prompt, completion, reported=False)

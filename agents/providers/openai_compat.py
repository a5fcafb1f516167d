"""OpenAI and every OpenAI-compatible server (vLLM, Ollama, LM Studio, gateways, Anthropic's
compatibility endpoint) through the official SDK's AsyncOpenAI client.

One client, hence one connection pool, per provider per process and event loop (a pool cannot
move between loops; a server has one loop, plus agentplatform.background's for async runs).
Non-streaming calls go through the SDK's raw `client.post` and read the JSON body instead of
building its pydantic objects: same request, same errors, less CPU on the hot path. Streaming calls take the same door with
stream=True and parse the server-sent events themselves (SSEDecoder + json.loads per event).
"""

from __future__ import annotations

import asyncio
import datetime
import email.utils
import json
import math
import time
import weakref
from typing import Any, AsyncIterator

import httpx
import openai

from .base import (Completion, ModelCall, Provider, ProviderError, ProviderStreamCut, ProviderTimeout, TextDelta,
                   ToolCall, Usage, estimate_tokens)


def retry_after_seconds(headers: Any, *, now: float | None = None) -> float | None:
    """How long the upstream asked us to wait: `retry-after-ms` (OpenAI's, milliseconds) or
    `Retry-After` (seconds, or an HTTP date); None when absent, unreadable or in the past."""
    ms = headers.get("retry-after-ms")
    if ms is not None:
        try:
            value = float(ms) / 1000
        except ValueError:
            value = None
        if value is not None and math.isfinite(value) and value >= 0:
            return value
    raw = headers.get("retry-after")
    if raw is None:
        return None
    try:
        value = float(raw)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(raw)
        except (TypeError, ValueError):
            return None
        if when.tzinfo is None:  # an HTTP date is GMT; parsedate_to_datetime leaves "-0000" naive
            when = when.replace(tzinfo=datetime.timezone.utc)
        value = when.timestamp() - (time.time() if now is None else now)
        return value if value > 0 else None
    return value if math.isfinite(value) and value >= 0 else None


def _retry_after(exc: openai.APIStatusError) -> float | None:
    return retry_after_seconds(exc.response.headers) if exc.response is not None else None


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
        retry_after = _retry_after(exc)
        return ProviderError(f"{provider} answered {status}: {_upstream_message(exc)}", code="upstream_error",
                             permanent=permanent, upstream_status=status, retry_after=retry_after,
                             headers={"Retry-After": str(math.ceil(retry_after))} if retry_after else None)
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
        # id(loop) -> (the loop, weakly; its client)
        self._clients: dict[int, tuple[weakref.ref, openai.AsyncOpenAI]] = {}

    def _client(self) -> openai.AsyncOpenAI:
        if not self.api_key:
            raise ProviderError(f"The {self.name} provider has no API key configured.",
                                code="provider_not_configured", permanent=True)
        loop = asyncio.get_running_loop()
        held = self._clients.get(id(loop))
        if held is not None and held[0]() is loop:
            return held[1]
        # Retries are the runtime's job (agents.resilience: within the run's deadline, seen
        # by the circuit breakers, metered per attempt), not the SDK's.
        client = openai.AsyncOpenAI(api_key=self.api_key, base_url=self.base_url, max_retries=0,
                                    http_client=_http_client())
        # Clients of loops that are gone or closed (a test's, an asyncio.run()'s) are dropped.
        live = {key: (ref, c) for key, (ref, c) in self._clients.items()
                if (other := ref()) is not None and not other.is_closed()}
        live[id(loop)] = (weakref.ref(loop), client)
        self._clients = live
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
        """The answer's text as it comes, then the whole Completion. The answer is whole once a
        finish reason or `[DONE]` arrived; a stream that ends or breaks with neither is
        ProviderStreamCut. A connection that breaks after the finish reason lost only the
        trailer (the usage chunk, `[DONE]`): the answer stands, its usage estimated if the usage
        chunk was lost too (the openai SDK, too, accepts a stream that ends without `[DONE]`).
        A failure after the upstream's 200 carries the call's `usage`."""
        client = self._client()
        kwargs = self._kwargs(call)
        timeout = kwargs.pop("timeout")
        parts: list[str] = []
        calls: dict[int, dict] = {}
        usage: Usage | None = None
        finish_reason = "stop"
        finished = False  # a finish reason arrived
        accepted = False  # the upstream answered 200: from here on the call costs tokens
        model = call.model

        def failed(error: ProviderError) -> ProviderError:
            if accepted:
                error.usage = usage or _estimated_usage(call, "".join(parts), _tool_calls(calls))
            return error

        try:
            # complete()'s door with stream=True: the SDK still sends the request (auth, base
            # URL, timeouts, its transport) and raises the status errors that come before the
            # body, but hands back the unread response. Its AsyncStream would build a pydantic
            # ChatCompletionChunk per token, most of a stream's CPU; we json.loads the events.
            response = await client.post(
                "/chat/completions", cast_to=httpx.Response,
                body={**kwargs, "stream": True, "stream_options": {"include_usage": True}},
                options={"timeout": timeout}, stream=True)
            accepted = True
            try:
                decoder = SSEDecoder()
                done = False
                async for raw in response.aiter_bytes():
                    for data in decoder.feed(raw):
                        if data.startswith(b"[DONE]"):
                            done = True
                            break
                        chunk = json.loads(data)
                        if chunk.get("error"):
                            raise _stream_error(chunk, response)
                        model = chunk.get("model") or model
                        if (chunk_usage := chunk.get("usage")) is not None:
                            usage = Usage(int(chunk_usage.get("prompt_tokens") or 0),
                                          int(chunk_usage.get("completion_tokens") or 0))
                        for choice in chunk.get("choices") or ():
                            delta = choice.get("delta") or {}
                            if content := delta.get("content"):
                                if not isinstance(content, str):
                                    raise TypeError("content is not a string")
                                parts.append(content)
                                yield TextDelta(content)
                            for tc in delta.get("tool_calls") or ():
                                slot = calls.setdefault(tc.get("index") or 0, {"id": "", "name": "", "arguments": []})
                                if tc.get("id"):
                                    slot["id"] = tc["id"]
                                if function := tc.get("function"):
                                    if function.get("name"):
                                        slot["name"] = function["name"]
                                    if function.get("arguments"):
                                        slot["arguments"].append(function["arguments"])
                            if choice.get("finish_reason"):
                                finish_reason = choice["finish_reason"]
                                finished = True
                    if done:
                        break
                if not (done or finished):
                    # The body ended cleanly, or with an unfinished event (the decoder drops it).
                    raise failed(ProviderStreamCut(
                        f"{self.name}'s stream ended before the answer was complete (no finish reason, no [DONE])."))
            finally:
                # Closing the response closes the upstream connection: a client that went
                # away stops the generation we pay for.
                await response.aclose()
        except (openai.APIError, httpx.HTTPError, asyncio.TimeoutError) as exc:
            # A bare transport error after the 200 (the SDK wraps those before it) is the
            # connection breaking mid-body: reset, or closed before the body ended. A timeout
            # stays a timeout; after the finish reason only the trailer is lost.
            broke = accepted and isinstance(exc, httpx.TransportError) and not isinstance(exc, httpx.TimeoutException)
            if not broke:
                raise failed(provider_error(exc, self.name)) from exc
            if not finished:
                raise failed(ProviderStreamCut(f"{self.name} broke off the stream before the answer was complete "
                                               f"({type(exc).__name__}).")) from exc
        except (ValueError, TypeError, AttributeError) as exc:  # JSON (and UTF-8) errors are ValueErrors
            raise failed(ProviderError(f"{self.name} sent a stream event that is not a chat completion chunk.",
                                       code="upstream_bad_response")) from exc
        tool_calls = _tool_calls(calls)
        content = "".join(parts)
        if usage is None:
            usage = _estimated_usage(call, content, tool_calls)
        yield Completion(content=content, tool_calls=tool_calls, usage=usage, finish_reason=finish_reason, model=model)

    async def aclose(self) -> None:
        loop = asyncio.get_running_loop()
        clients, self._clients = self._clients, {}
        for ref, client in clients.values():
            other = ref()
            if other is loop:
                await client.close()
            elif other is not None and other.is_running():
                # Another loop's client is closed on its own loop (agentplatform.background's).
                asyncio.run_coroutine_threadsafe(client.close(), other)


def _stream_error(chunk: dict, response: httpx.Response) -> openai.APIError:
    """An error event inside a 200 stream, as the SDK's AsyncStream reports it."""
    error = chunk["error"]
    message = error.get("message") if isinstance(error, dict) else None
    if not message or not isinstance(message, str):
        message = "An error occurred during streaming"
    return openai.APIError(message, response.request, body=error)


class SSEDecoder:
    """Server-sent events from raw bytes: `feed` returns the data of each event it completed.

    Per the SSE spec: lines end with LF, CRLF or CR (a CRLF may be split across reads); an
    event is its `data:` lines joined by LF and ends at a blank line; lines starting with `:`
    (comments, heartbeats) and other fields (event, id, retry) are skipped, as are events
    without data; an unfinished event at the end of the stream is dropped. Bytes, not str:
    a multi-byte character split across reads is only decoded whole, by json.loads.
    """

    __slots__ = ("_tail", "_data", "_skip_lf")

    def __init__(self) -> None:
        self._tail = b""
        self._data: list[bytes] = []
        self._skip_lf = False

    def feed(self, chunk: bytes) -> list[bytes]:
        if self._skip_lf:
            self._skip_lf = False
            if chunk[:1] == b"\n":
                chunk = chunk[1:]
        buffer = self._tail + chunk if self._tail else chunk
        if b"\r" in buffer:
            # A CR at the very end may be half of a CRLF: its LF must not end a second line.
            self._skip_lf = buffer.endswith(b"\r")
            buffer = buffer.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        lines = buffer.split(b"\n")
        self._tail = lines.pop()
        events: list[bytes] = []
        data = self._data
        for line in lines:
            if not line:
                if data:
                    event = data[0] if len(data) == 1 else b"\n".join(data)
                    if event.strip():  # `data:` alone is a keep-alive some servers send
                        events.append(event)
                    data = []
            elif line.startswith(b"data:"):
                data.append(line[6:] if line[5:6] == b" " else line[5:])
            elif line == b"data":
                data.append(b"")
        self._data = data
        return events


def _tool_calls(calls: dict[int, dict]) -> list[ToolCall]:
    """The streamed tool calls, their fragments joined, in index order."""
    return [ToolCall(id=slot["id"] or f"call_{index}", name=slot["name"], arguments="".join(slot["arguments"]) or "{}")
            for index, slot in sorted(calls.items())]


def _estimated_usage(call: ModelCall, content: str, tool_calls: list[ToolCall]) -> Usage:
    prompt = sum(estimate_tokens(json.dumps(m.get("content") or "")) + 4 for m in call.messages)
    completion = estimate_tokens(content) + sum(estimate_tokens(tc.arguments) + 4 for tc in tool_calls)
    return Usage(prompt, completion, reported=False)

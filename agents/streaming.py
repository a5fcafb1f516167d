"""The runtime events of a chat turn, framed for each transport: the one place that builds the
`start`, `done` and `error` events and encodes events for SSE, the OpenAI-compatible stream and
WebSocket frames. Transports only pick the encoder:

    sse_stream(turn)                    -> bytes: `event: <type>` + one JSON `data:` line each
    openai_stream(turn, include_usage)  -> bytes: `chat.completion.chunk`s, then `data: [DONE]`
    ws_text(event)                      -> str:   one JSON text frame

Events: `start` {run_id, session_id, agent, model, variant?}; the runtime's own `delta`,
`tool_call`, `tool_result`, `usage`; then exactly one of `done` {id, run_id, session_id, agent,
model, output, tool_calls, finish_reason, usage, cost_usd, latency_ms, cancelled} or `error`
{code, message, status, request_id, param?, details?, retry_after?, run_id?, session_id?}: the
fields of our one JSON error shape, flat. The pipeline (ChatTurn.events) sends `done`/`error`
only once the run is committed, so a client that reads its run right after `done` finds it.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import TYPE_CHECKING, Any, AsyncIterator

from django.conf import settings
from django.http import StreamingHttpResponse

from agentplatform.errors import PlatformError

if TYPE_CHECKING:
    from .pipeline import ChatTurn

HEARTBEAT = b": heartbeat\n\n"
_dumps = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, default=str).encode


# --- the events -----------------------------------------------------------------------------


def start_event(turn: ChatTurn) -> dict:
    event = {"type": "start", "run_id": str(turn.run_id),
             "session_id": str(turn.session_id) if turn.session_id else None,
             "agent": turn.agent.name, "model": turn.agent.model}
    if turn.notes.get("variant"):
        event["variant"] = str(turn.notes["variant"])
    return event


def done_event(turn: ChatTurn, *, cancelled: bool = False) -> dict:
    """The run's result (the REST answer's fields) plus run_id, finish_reason and `cancelled`.
    A cancelled run reports what it produced and its usage as billed (the in-flight call
    estimated by the metering stage)."""
    run = turn.run
    assert run is not None
    result = turn.result()
    result.update(type="done", run_id=result["id"], model=run.model or turn.agent.model,
                  finish_reason="cancelled" if cancelled else run.finish_reason, cancelled=cancelled)
    if cancelled:
        result["output"] = run.partial_output
        result["usage"] = turn.billed_usage or {**run.usage.as_dict(), "estimated": False}
    return result


def error_event(error: PlatformError, request_id: str | None = None, **extra: Any) -> dict:
    """Our one JSON error shape, flat in an `error` event (the event's own `type` is "error";
    `status` is the HTTP status the same error has on REST; `retry_after` in seconds)."""
    event = {"type": "error", "code": error.code, "message": error.message, "status": error.http_status,
             "request_id": request_id}
    if error.param is not None:
        event["param"] = error.param
    if error.details is not None:
        event["details"] = error.details
    retry_after = error.headers.get("Retry-After") or getattr(error, "retry_after", None)
    if retry_after is not None:
        try:
            event["retry_after"] = max(1, int(float(retry_after)))
        except (TypeError, ValueError):
            pass
    event.update(extra)
    return event


def turn_error_event(turn: ChatTurn, event: dict) -> dict:
    """The `error` event of a run that failed (the runtime's event carries only code and message)."""
    error = turn.run.error if turn.run is not None and turn.run.error is not None else \
        PlatformError(event.get("message"), code=event.get("code"), http_status=event.get("status"))
    return error_event(error, turn.request_id, run_id=str(turn.run_id),
                       session_id=str(turn.session_id) if turn.session_id else None)


# --- encoders -------------------------------------------------------------------------------


def ws_text(event: dict) -> str:
    return _dumps(event)


def sse_event(event: dict) -> bytes:
    """`event: <type>` plus one JSON `data:` line that carries the type too."""
    return b"event: " + event["type"].encode() + b"\ndata: " + _dumps(event).encode() + b"\n\n"


async def sse_stream(turn: ChatTurn) -> AsyncIterator[bytes]:
    yield sse_event(start_event(turn))
    async for event in turn.events():
        kind = event["type"]
        if kind == "done":
            event = done_event(turn)
        elif kind == "error":
            event = turn_error_event(turn, event)
        yield sse_event(event)


def completion_id(turn: ChatTurn) -> str:
    return f"chatcmpl-{turn.run_id.hex}"


async def openai_stream(turn: ChatTurn, include_usage: bool) -> AsyncIterator[bytes]:
    """Chat Completions chunks as OpenAI sends them; a failure is a `data: {"error": ...}`
    event, which the openai SDK raises as an APIError."""
    base = {"id": completion_id(turn), "object": "chat.completion.chunk", "created": int(time.time()),
            "model": turn.agent.name, "system_fingerprint": None}

    def data(payload: dict) -> bytes:
        return b"data: " + _dumps(payload).encode() + b"\n\n"

    def chunk(delta: dict, finish_reason=None) -> bytes:
        return data({**base, "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason,
                                          "logprobs": None}]})

    yield chunk({"role": "assistant", "content": ""})
    async for event in turn.events():
        kind = event["type"]
        if kind == "delta":
            yield chunk({"content": event["content"]})
        elif kind == "done":
            yield chunk({}, event.get("finish_reason") or "stop")
            if include_usage:
                yield data({**base, "choices": [], "usage": turn.run.usage.as_dict()})
        elif kind == "error":
            error = turn.run.error or PlatformError(event["message"], code=event["code"])
            yield data({"error": error.as_dict(turn.request_id)})
    yield b"data: [DONE]\n\n"


async def with_heartbeats(source: AsyncIterator[bytes], interval: float) -> AsyncIterator[bytes]:
    """Yield from `source`, inserting a comment line whenever it is silent for `interval` seconds,
    so proxies and load balancers keep an idle stream open. The pending read is never
    cancelled by a heartbeat; closing this generator closes `source`."""
    iterator = source.__aiter__()
    pending: asyncio.Future | None = None
    try:
        while True:
            if pending is None:
                pending = asyncio.ensure_future(iterator.__anext__())
            done, _ = await asyncio.wait((pending,), timeout=interval)
            if not done:
                yield HEARTBEAT
                continue
            try:
                chunk = pending.result()
            except StopAsyncIteration:
                return
            finally:
                pending = None
            yield chunk
    finally:
        if pending is not None and not pending.done():
            pending.cancel()
            try:
                await pending
            except (asyncio.CancelledError, StopAsyncIteration, Exception):
                pass
        aclose = getattr(iterator, "aclose", None)
        if aclose is not None:
            await aclose()


def event_stream_response(source: AsyncIterator[bytes], headers: dict[str, str]) -> StreamingHttpResponse:
    """A text/event-stream response with heartbeats; proxies told not to buffer it."""
    response = StreamingHttpResponse(with_heartbeats(source, settings.SSE_HEARTBEAT_SECONDS),
                                     content_type="text/event-stream")
    response["Cache-Control"] = "no-cache"
    response["X-Accel-Buffering"] = "no"  # nginx: do not buffer the stream
    for name, value in headers.items():
        response[name] = value
    return response

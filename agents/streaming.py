"""The runtime events of a chat turn, framed for each transport: the one place that builds the
`start`, `done` and `error` events and encodes events for SSE, the OpenAI-compatible stream and
WebSocket frames. Transports only pick the encoder:

    await stream_response(turn, sse_stream)     -> `event: <type>` + one JSON `data:` line each
    await stream_response(turn, openai_stream, include_usage=...)
                                                -> `chat.completion.chunk`s, then `data: [DONE]`
    ws_text(event)                              -> one JSON text frame

An HTTP stream starts (status 200, headers) only once the model has answered: stream_response
reads the turn's first event first (`answered`), so a turn whose every model failed before
producing anything raises its error, which the view answers with its real status (a 502, a 503
with Retry-After) and our JSON error body. That wait is bounded by SSE_HEARTBEAT_SECONDS: a
model slower than that gets its 200 and heartbeats (as an idle stream would), and a failure after
that is an `error` event. The OpenAI-compatible stream's role chunk waits for the model too.

Events: `start` {run_id, session_id, agent, model, variant?}; the runtime's own `delta`,
`tool_call`, `tool_result`, `usage`; then exactly one of `done` {id, run_id, session_id, agent,
model, output, tool_calls, finish_reason, usage, cost_usd, latency_ms, variant, cancelled} or `error`
{code, message, status, request_id, param?, details?, retry_after?, run_id?, session_id?}: the
fields of our one JSON error shape, flat. The pipeline (ChatTurn.events) sends `done`/`error`
only once the run is committed, so a client that reads its run right after `done` finds it.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from contextlib import aclosing
from typing import TYPE_CHECKING, Any, AsyncIterator, Awaitable, Callable

from django.conf import settings
from django.http import StreamingHttpResponse

from agentplatform import metrics
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
    if turn.variant:
        event["variant"] = turn.variant
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


def _status_fields(error: PlatformError) -> dict:
    """What a stream's error adds to our JSON error shape: `status`, the HTTP status the same
    error has on REST, and `retry_after` in whole seconds (at least 1) where one applies (our
    rate limits, an upstream's Retry-After)."""
    fields: dict[str, Any] = {"status": error.http_status}
    retry_after = error.headers.get("Retry-After") or getattr(error, "retry_after", None)
    if retry_after is not None:
        try:
            fields["retry_after"] = max(1, math.ceil(float(retry_after)))
        except (TypeError, ValueError, OverflowError):
            pass
    return fields


def error_event(error: PlatformError, request_id: str | None = None, **extra: Any) -> dict:
    """Our one JSON error shape, flat in an `error` event (the event's own `type` is "error"),
    with `status` and `retry_after` (`_status_fields`)."""
    event = {"type": "error", "code": error.code, "message": error.message, "request_id": request_id}
    if error.param is not None:
        event["param"] = error.param
    if error.details is not None:
        event["details"] = error.details
    event.update(_status_fields(error))
    event.update(extra)
    return event


def turn_error(turn: ChatTurn, event: dict) -> PlatformError:
    """The error a run failed with (the runtime's `error` event carries only code, message, status)."""
    if turn.run is not None and turn.run.error is not None:
        return turn.run.error
    return PlatformError(event.get("message"), code=event.get("code"), http_status=event.get("status"))


def with_turn_headers(turn: ChatTurn, error: PlatformError) -> PlatformError:
    """The error answered with the turn's response headers too (X-Agent-Variant: a failed
    request still says which variant failed); the error's own headers win."""
    if turn.response_headers:
        error.headers = {**turn.response_headers, **error.headers}
    return error


def turn_error_event(turn: ChatTurn, event: dict) -> dict:
    """The `error` event of a run that failed, naming its run and session."""
    return error_event(turn_error(turn, event), turn.request_id, run_id=str(turn.run_id),
                       session_id=str(turn.session_id) if turn.session_id else None)


# --- the first event: an HTTP stream starts once the model has answered ----------------------


async def answered(turn: ChatTurn, wait: float) -> AsyncIterator[dict]:
    """The turn's events, once its first one arrived or `wait` seconds passed. Raises the
    run's error when that first event is the `error` of a run that failed before it produced
    anything (every model failed, a timeout): the run is stored by then and nothing was sent,
    so the caller can still answer with a real HTTP status. A request cancelled meanwhile (the
    client left) ends the turn, stored as cancelled."""
    events = turn.events()
    first = asyncio.ensure_future(_first_of(events))
    resumed = _Resumed(first, events)
    try:
        await asyncio.wait((first,), timeout=wait)
        if first.done() and (event := first.result()) is not None and event["type"] == "error":
            raise with_turn_headers(turn, turn_error(turn, event))
    except BaseException:
        await resumed.aclose()
        raise
    return resumed  # the first event is in (or, with a slow model, on its way)


async def _first_of(events: AsyncIterator[dict]) -> dict | None:
    try:
        return await anext(events)
    except StopAsyncIteration:  # a turn abandoned before it was read: nothing to stream
        return None


class _Resumed:
    """The events again, the first one read ahead: it, then the rest straight from the turn (no
    extra frame per event). `aclose` ends the turn whether or not anyone started reading."""

    __slots__ = ("_first", "_events")

    def __init__(self, first: asyncio.Future, events: AsyncIterator[dict]) -> None:
        self._first: asyncio.Future | None = first
        self._events = events

    def __aiter__(self) -> _Resumed:
        return self

    def __anext__(self) -> Awaitable[dict]:
        if self._first is None:
            return self._events.__anext__()
        return self._take_first()

    async def _take_first(self) -> dict:
        event = await self._first
        self._first = None
        if event is None:
            raise StopAsyncIteration
        return event

    async def aclose(self) -> None:
        first, self._first = self._first, None
        if first is not None and not first.done():
            first.cancel()
            await asyncio.wait((first,))  # the pipeline stores the run as cancelled
        await asyncio.shield(self._events.aclose())


# --- encoders -------------------------------------------------------------------------------


def ws_text(event: dict) -> str:
    return _dumps(event)


def sse_event(event: dict) -> bytes:
    """`event: <type>` plus one JSON `data:` line that carries the type too."""
    return b"event: " + event["type"].encode() + b"\ndata: " + _dumps(event).encode() + b"\n\n"


async def sse_stream(turn: ChatTurn, events: AsyncIterator[dict]) -> AsyncIterator[bytes]:
    yield sse_event(start_event(turn))
    async with aclosing(events):  # a client gone: the turn ends (stored as cancelled) at once
        async for event in events:
            kind = event["type"]
            if kind == "done":
                event = done_event(turn)
            elif kind == "error":
                event = turn_error_event(turn, event)
            yield sse_event(event)


def completion_id(turn: ChatTurn) -> str:
    return f"chatcmpl-{turn.run_id.hex}"


async def openai_stream(turn: ChatTurn, events: AsyncIterator[dict], include_usage: bool = False
                        ) -> AsyncIterator[bytes]:
    """Chat Completions chunks as OpenAI sends them, the role chunk once the model answered (its
    first delta, tool step or end); a failure is a `data: {"error": ...}` event (our error
    shape plus `status` and `retry_after`), which the openai SDK raises as an APIError."""
    base = {"id": completion_id(turn), "object": "chat.completion.chunk", "created": int(time.time()),
            "model": turn.agent.name, "system_fingerprint": None}

    def data(payload: dict) -> bytes:
        return b"data: " + _dumps(payload).encode() + b"\n\n"

    def chunk(delta: dict, finish_reason=None) -> bytes:
        return data({**base, "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason,
                                          "logprobs": None}]})

    answering = False
    async with aclosing(events):  # a client gone: the turn ends (stored as cancelled) at once
        async for event in events:
            kind = event["type"]
            if kind == "error":
                error = turn_error(turn, event)
                yield data({"error": {**error.as_dict(turn.request_id), **_status_fields(error)}})
                continue
            if not answering:
                answering = True
                yield chunk({"role": "assistant", "content": ""})
            if kind == "delta":
                yield chunk({"content": event["content"]})
            elif kind == "done":
                yield chunk({}, event.get("finish_reason") or "stop")
                if include_usage:
                    yield data({**base, "choices": [], "usage": turn.run.usage.as_dict()})
    yield b"data: [DONE]\n\n"


async def with_heartbeats(source: AsyncIterator[bytes], interval: float, transport: str = "sse"
                          ) -> AsyncIterator[bytes]:
    """Yield from `source`, inserting a comment line whenever it is silent for `interval` seconds,
    so proxies and load balancers keep an idle stream open. The pending read is never
    cancelled by a heartbeat; closing this generator closes `source`. Counted in
    `active_streams{transport}` while it is sent."""
    iterator = source.__aiter__()
    pending: asyncio.Future | None = None
    metrics.stream_opened(transport)
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
        metrics.stream_closed(transport)
        if pending is not None and not pending.done():
            pending.cancel()
            try:
                await pending
            except (asyncio.CancelledError, StopAsyncIteration, Exception):
                pass
        elif pending is not None and not pending.cancelled():
            pending.exception()  # read, so that asyncio does not log it as never retrieved
        aclose = getattr(iterator, "aclose", None)
        if aclose is not None:
            await aclose()


async def stream_response(turn: ChatTurn, encode: Callable[..., AsyncIterator[bytes]],
                          **options: Any) -> StreamingHttpResponse:
    """The turn as a text/event-stream response in `encode`'s format, started once the model
    answered (`answered`); raises the run's error if it failed before that."""
    events = await answered(turn, settings.SSE_HEARTBEAT_SECONDS)
    return event_stream_response(encode(turn, events, **options), turn.response_headers, transport=str(turn.transport))


def event_stream_response(source: AsyncIterator[bytes], headers: dict[str, str],
                          transport: str = "sse") -> StreamingHttpResponse:
    """A text/event-stream response with heartbeats; proxies told not to buffer it."""
    response = StreamingHttpResponse(with_heartbeats(source, settings.SSE_HEARTBEAT_SECONDS, transport),
                                     content_type="text/event-stream")
    response["Cache-Control"] = "no-cache"
    response["X-Accel-Buffering"] = "no"  # nginx: do not buffer the stream
    for name, value in headers.items():
        response[name] = value
    return response

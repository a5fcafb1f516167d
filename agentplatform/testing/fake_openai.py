"""A fake OpenAI-compatible upstream for tests and benchmarks.

It speaks real HTTP/1.1 (keep-alive, Content-Length or chunked request bodies) on raw
asyncio streams, so the code under test goes through its real HTTP client, and it is
cheap enough per request (well under 1 ms of CPU) to serve as the baseline when we
measure the latency our platform adds. It uses only the standard library (plus uvloop
when importable) and never imports Django.

CLI::

    python -m agentplatform.testing.fake_openai [--host 127.0.0.1] [--port 9100]
        [--latency-ms 0] [--token-gap-ms 0] [--tokens 0]

    (or ``python agentplatform/testing/fake_openai.py ...``, which skips importing the
    ``agentplatform`` package and with it Celery and Django: faster to start.)

It prints ``fake-openai listening on http://HOST:PORT/v1`` once the socket listens;
``--port 0`` picks a free port and prints it. ``--latency-ms`` delays every response,
``--token-gap-ms`` spaces stream chunks, ``--tokens N`` makes every reply N words unless
the request says otherwise (0, the default, means echo mode). SIGINT/SIGTERM stop it.

Endpoints::

    POST /v1/chat/completions   chat.completion, or chat.completion.chunk SSE if "stream"
    GET  /v1/models             {"object": "list", "data": [...]}; /v1/models/<id> too
    GET  /health                {"status": "ok"}
    GET  /_stats                {"requests": N, "by_model": {"<model>": N}}
    POST /_reset                zeroes the stats

Anything else is a 404, a malformed body (or directive) a 400, both in OpenAI's error
shape ``{"error": {"message", "type", "param", "code"}}``. ``/_stats`` counts every POST
to chat completions, faults and 400s included (malformed JSON has no model in by_model).

Behaviour is deterministic and scripted by the request. Directives are read from the
last user message (and removed from the echoed text):

``[tokens:N]``
    Reply with exactly N words ``"w1 w2 ... wN"`` instead of echoing (0: empty reply).
``[latency:MS]``
    Wait MS milliseconds before responding (default ``--latency-ms``).
``[gap:MS]``
    Wait MS milliseconds between stream chunks (default ``--token-gap-ms``).
``[fault:429|500|400|401|<any 4xx/5xx>|hang|cut|cut-clean|cut-event|cut-after-finish]``
    Fail. The same fault is triggered by a model name containing ``fault-429``,
    ``fault-hang``, ``fault-cut-clean`` and so on, so a test can make one model fail and
    its fallback succeed. 429 carries ``Retry-After: 1``; ``[retry-after:N]`` overrides it
    (and adds the header to any other fault). ``hang`` never answers: it waits until the
    client disconnects. The stream cuts (without ``stream`` every one of them sends the
    headers with a Content-Length and only half of the body, then closes):

    * ``cut`` streams the role chunk and the first couple of deltas, then closes the
      connection mid-body (no finish chunk, no ``[DONE]``, no end of the chunked body:
      what a reset connection looks like to the client);
    * ``cut-clean`` sends the same chunks, then ends the body properly: an HTTP-complete
      stream without a finish chunk and without ``[DONE]`` (a proxy that gave up);
    * ``cut-event`` sends the same chunks, then the first half of the next event's
      ``data:`` line (mid-JSON, no blank line), then ends the body properly;
    * ``cut-after-finish`` sends every chunk including the finish chunk, then closes
      mid-body before the usage chunk and ``[DONE]``.
``[cut-after:N]``
    With ``cut``, ``cut-clean`` or ``cut-event``: send N chunks before the cut, the role
    chunk included (default 3; 1: only the role chunk, no content).
``[fault-step:N]``
    Apply the fault only to step N of an agent's tool loop: the call whose conversation
    has N-1 assistant messages after the last user message. Other calls answer normally,
    so a test can fail the call that follows a tool result.
``[fault-times:N]``
    The fault (directive or model name) hits only the first N requests carrying the same
    last user message to the same model; later ones answer normally, as a recovered upstream
    does (``[fault:429] [fault-times:1]``: a 429, then success on the retry). Counted per
    server; ``/_reset`` forgets the counts.
``[retry-after-ms:N]``
    Add the ``retry-after-ms: N`` header (OpenAI's, in milliseconds) to the fault.
``[call:NAME]`` or ``[call:NAME {"json": "args"}]``
    When the last message is a user message: answer with a call to tool NAME
    (finish_reason ``tool_calls``, no content). Several directives give parallel calls.
    If NAME is not among the offered ``tools`` (or ``tool_choice`` is ``"none"``), the
    reply is a text saying so. Streamed like OpenAI: the role chunk (content null)
    opens the first call with its index, id, type, name and arguments ``""`` (further
    calls open in a chunk of their own); each call's arguments JSON follows in
    fragments of up to 8 characters, at least two.

Without directives the reply is ``"Echo: " + <last user message, whitespace-normalized>``;
if the last message is a tool result, it is ``"Tool result: " + <its first 200 chars>``.
``max_tokens`` (or ``max_completion_tokens``) caps the reply's tokens; the reply is
then truncated and finish_reason is ``length``, as OpenAI does.

A token is a word with its trailing whitespace; a stream sends a role chunk
(``{"role": "assistant", "content": ""}``), one content delta per token, a chunk with
an empty delta and the finish_reason, then ``data: [DONE]``. Usage: prompt_tokens = words across all message contents + 1 per message (at
least 1); completion_tokens = reply tokens, or per tool call the words of its
arguments JSON + 1. ``stream_options.include_usage`` adds OpenAI's final
``choices: []`` chunk carrying the usage.

In tests, run it in a background thread::

    with FakeOpenAIServer() as server:
        client = openai.OpenAI(base_url=server.base_url, api_key="x")
        ...
        assert server.stats()["requests"] == 1
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import logging
import os
import re
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache
from http import HTTPStatus
from types import TracebackType
from typing import Any, Self

try:  # uvloop trims ~20% of the per-request CPU (and more on streams); optional.
    import uvloop

    _new_event_loop: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
except ImportError:  # pragma: no cover - depends on the environment
    _new_event_loop = asyncio.new_event_loop

__all__ = ("FakeConfig", "FakeOpenAI", "FakeOpenAIServer", "MODELS", "main")

logger = logging.getLogger(__name__)

MODELS: tuple[str, ...] = ("fake-model", "fake-model-mini", "gpt-4o-mini")
"""Listed by GET /v1/models; chat completions accept any model name."""

MAX_BODY_BYTES = 32 * 1024 * 1024
MAX_HEAD_BYTES = 64 * 1024
MAX_TOKENS = 100_000  # a [tokens:N] beyond this is a test bug, not a load test
TOOL_RESULT_CHARS = 200

_JSON = "application/json"
_SSE = "text/event-stream; charset=utf-8"
_DONE_EVENT = b"data: [DONE]\n\n"
_LAST_CHUNK = b"0\r\n\r\n"
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"

# Directives: a word, a colon, a value without spaces, in brackets. [call:...] is parsed
# separately because its JSON arguments may contain spaces and brackets.
_DIRECTIVE_RE = re.compile(
    r"\[(tokens|latency|gap|fault-times|fault-step|fault|retry-after-ms|retry-after|cut-after):\s*([^\]\s]*)\s*\]",
    re.I)
_CALL_RE = re.compile(r"\[call:\s*([A-Za-z0-9_.\-]+)", re.I)
_CUTS = ("cut", "cut-clean", "cut-event", "cut-after-finish")
_MODEL_FAULT_RE = re.compile(r"fault-(\d{3}|hang|cut-clean|cut-event|cut-after-finish|cut)", re.I)
_TOKEN_RE = re.compile(r"\S+\s*")
_JSON_DECODER = json.JSONDecoder()

# (type, code, message) per injected status; OpenAI's own values where it has them.
_FAULTS: dict[int, tuple[str, str, str]] = {
    400: ("invalid_request_error", "invalid_request", "Injected fault: invalid request."),
    401: ("invalid_request_error", "invalid_api_key", "Injected fault: incorrect API key provided."),
    403: ("permission_error", "permission_denied", "Injected fault: permission denied."),
    404: ("invalid_request_error", "model_not_found", "Injected fault: the model does not exist."),
    429: ("rate_limit_error", "rate_limit_exceeded", "Injected fault: rate limit reached, retry later."),
}
_SERVER_FAULT = ("server_error", "server_error", "Injected fault: the server had an error processing your request.")


@lru_cache(maxsize=None)
def _status_line(status: int) -> bytes:
    try:
        phrase = HTTPStatus(status).phrase
    except ValueError:
        phrase = "Unknown"
    return f"HTTP/1.1 {status} {phrase}\r\n".encode()


@lru_cache(maxsize=256)
def _words(n: int) -> str:
    # Cached: benchmarks send the same [tokens:N] over and over.
    return " ".join(f"w{i}" for i in range(1, n + 1))


def _model_object(model: str) -> dict[str, Any]:
    return {"id": model, "object": "model", "created": 1700000000, "owned_by": "fake-openai"}


def _error_body(message: str, type_: str, code: str | None, param: str | None = None) -> bytes:
    return json.dumps({"error": {"message": message, "type": type_, "param": param, "code": code}}).encode()


def _text_of(content: Any) -> str:
    """The text of a message's content: a string, or a list of parts as OpenAI allows."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(
            part["text"]
            for part in content
            if isinstance(part, dict) and isinstance(part.get("text"), str)
        )
    return ""


@dataclass(frozen=True, slots=True)
class FakeConfig:
    """Defaults for requests that carry no directive (the CLI flags)."""

    latency_ms: float = 0.0
    token_gap_ms: float = 0.0
    tokens: int = 0  # 0: echo mode


class _BadRequest(Exception):
    def __init__(self, message: str, *, code: str = "invalid_request", param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.code = code
        self.param = param


@dataclass(slots=True)
class _Reply:
    """What one chat completion request asks of us, decided before any I/O."""

    model: str
    stream: bool = False
    include_usage: bool = False
    latency_s: float = 0.0
    gap_s: float = 0.0
    fault: str | None = None  # "429", "500", ..., "hang", one of _CUTS
    retry_after: str | None = None
    cut_after: int = 3  # chunks a cut stream sends before it breaks, the role chunk included
    retry_after_ms: str | None = None
    fault_times: int | None = None  # the fault hits only the first N requests with this fault_key
    fault_key: str = ""
    content: str | None = None
    tool_calls: list[tuple[str, str]] = field(default_factory=list)  # (name, arguments JSON)
    finish_reason: str = "stop"
    prompt_tokens: int = 1
    completion_tokens: int = 0


def _number(name: str, value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        raise _BadRequest(f"Directive [{name}:{value}] needs a number.", code="invalid_directive") from None
    if number < 0 or number != number:
        raise _BadRequest(f"Directive [{name}:{value}] must be >= 0.", code="invalid_directive")
    return number


def _parse_calls(text: str) -> tuple[list[tuple[str, str]], str]:
    """Find [call:NAME] / [call:NAME {json}] directives; return them and the rest of the text.

    The arguments are decoded with raw_decode so that spaces, brackets and "]" inside
    JSON strings do not end the directive early.
    """
    calls: list[tuple[str, str]] = []
    rest: list[str] = []
    pos = 0
    while (match := _CALL_RE.search(text, pos)) is not None:
        rest.append(text[pos : match.start()])
        name, i = match.group(1), match.end()
        while i < len(text) and text[i].isspace():
            i += 1
        arguments: Any = {}
        if i < len(text) and text[i] != "]":
            try:
                arguments, i = _JSON_DECODER.raw_decode(text, i)
            except json.JSONDecodeError as exc:
                raise _BadRequest(f"Bad JSON arguments in [call:{name} ...]: {exc}", code="invalid_directive") from None
            while i < len(text) and text[i].isspace():
                i += 1
        if i >= len(text) or text[i] != "]":
            raise _BadRequest(f"Directive [call:{name} ...] is not closed by ']'.", code="invalid_directive")
        calls.append((name, json.dumps(arguments)))
        pos = i + 1
    rest.append(text[pos:])
    return calls, "".join(rest)


def _step(messages: list[dict[str, Any]]) -> int:
    """Which call of an agent's tool loop this is: 1 + the assistant messages after the last user message."""
    step = 1
    for message in reversed(messages):
        if message.get("role") == "user":
            break
        step += message.get("role") == "assistant"
    return step


def plan_reply(payload: Any, config: FakeConfig) -> _Reply:
    """Decide the whole answer to a chat completion request (pure; raises _BadRequest)."""
    if not isinstance(payload, dict):
        raise _BadRequest("The request body must be a JSON object.")
    model = payload.get("model")
    if not isinstance(model, str) or not model:
        raise _BadRequest("you must provide a model parameter", code="missing_model", param="model")
    messages = payload.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _BadRequest("'messages' must be a non-empty array.", code="invalid_messages", param="messages")
    messages = [m for m in messages if isinstance(m, dict)]

    reply = _Reply(model=model, stream=payload.get("stream") is True)
    options = payload.get("stream_options")
    reply.include_usage = reply.stream and isinstance(options, dict) and options.get("include_usage") is True
    reply.prompt_tokens = max(1, sum(len(_text_of(m.get("content")).split()) + 1 for m in messages))

    cap = payload.get("max_completion_tokens", payload.get("max_tokens"))
    if cap is not None and (not isinstance(cap, int) or isinstance(cap, bool) or cap < 1):
        raise _BadRequest("max_tokens must be a positive integer.", code="invalid_value", param="max_tokens")

    # Directives live in the last user message, wherever it sits in the conversation.
    user_text = ""
    for message in reversed(messages):
        if message.get("role") == "user":
            user_text = _text_of(message.get("content"))
            break

    latency_ms, gap_ms = config.latency_ms, config.token_gap_ms
    tokens: int | None = config.tokens or None  # a directive may ask for 0 words: an empty reply
    fault: str | None = None
    fault_step: int | None = None
    if "[" in user_text:  # the common benchmark request has no directive: skip the regexes
        for match in _DIRECTIVE_RE.finditer(user_text):
            name, value = match.group(1).lower(), match.group(2)
            if name == "tokens":
                tokens = int(_number(name, value))
                if tokens > MAX_TOKENS:
                    raise _BadRequest(f"[tokens:N] is limited to {MAX_TOKENS}.", code="invalid_directive")
            elif name == "latency":
                latency_ms = _number(name, value)
            elif name == "gap":
                gap_ms = _number(name, value)
            elif name == "retry-after":
                reply.retry_after = str(int(_number(name, value)))
            elif name == "cut-after":
                reply.cut_after = max(1, int(_number(name, value)))
            elif name == "fault-step":
                fault_step = max(1, int(_number(name, value)))
            elif name == "retry-after-ms":
                reply.retry_after_ms = str(int(_number(name, value)))
            elif name == "fault-times":
                reply.fault_times = int(_number(name, value))
                reply.fault_key = f"{model}\n{user_text}"
            else:
                fault = value.lower()
        user_text = _DIRECTIVE_RE.sub(" ", user_text)
    if fault is None and "fault-" in model.lower():
        if (match := _MODEL_FAULT_RE.search(model)) is not None:
            fault = match.group(1).lower()
    if fault is not None and fault != "hang" and fault not in _CUTS:
        if not (fault.isdigit() and 400 <= int(fault) <= 599):
            raise _BadRequest(f"Unknown fault {fault!r}: use a 4xx/5xx status, hang or {', '.join(_CUTS)}.",
                              code="invalid_directive")
    if fault_step is not None and fault_step != _step(messages):
        fault = None
    reply.fault = fault
    reply.latency_s = latency_ms / 1000
    reply.gap_s = gap_ms / 1000

    last = messages[-1] if messages else {}
    calls: list[tuple[str, str]] = []
    if last.get("role") == "user" and "[call:" in user_text.lower():
        calls, user_text = _parse_calls(user_text)

    if calls:
        offered = {
            tool["function"].get("name")
            for tool in payload.get("tools") or ()
            if isinstance(tool, dict) and isinstance(tool.get("function"), dict)
        }
        missing = [name for name, _ in calls if name not in offered]
        if payload.get("tool_choice") == "none":
            content = "Tool calls are disabled by tool_choice=none."
        elif missing:
            listed = ", ".join(sorted(n for n in offered if isinstance(n, str))) or "none"
            content = f"Tool {missing[0]} is not offered (offered: {listed})."
        else:
            reply.tool_calls = calls
            reply.finish_reason = "tool_calls"
            reply.completion_tokens = sum(len(arguments.split()) + 1 for _, arguments in calls)
            return reply
    elif last.get("role") == "tool":
        content = "Tool result: " + _text_of(last.get("content"))[:TOOL_RESULT_CHARS]
    elif tokens is not None:
        content = _words(tokens)
    else:
        content = "Echo: " + " ".join(user_text.split())

    count = len(_TOKEN_RE.findall(content))
    if cap is not None and count > cap:
        content = "".join(_TOKEN_RE.findall(content)[:cap]).rstrip()
        count = cap
        reply.finish_reason = "length"
    reply.content = content
    reply.completion_tokens = count
    return reply


class FakeOpenAI:
    """The server: one instance per listening socket, driven by one event loop.

    Stats are guarded by a lock because FakeOpenAIServer reads and resets them from
    the test's thread while the loop thread counts requests.
    """

    def __init__(self, config: FakeConfig | None = None) -> None:
        self.config = config or FakeConfig()
        self._lock = threading.Lock()
        self._requests = 0
        self._by_model: dict[str, int] = {}
        self._fault_counts: dict[str, int] = {}  # [fault-times:N]: requests seen per fault key
        self._connections: set[asyncio.Task[Any]] = set()
        self._server: asyncio.Server | None = None
        # Ids only need to be unique per run; a counter is cheaper than uuid4 per request.
        self._prefix = os.urandom(4).hex()
        self._ids = itertools.count(1)
        self._models_body = json.dumps(
            {
                "object": "list",
                "data": [_model_object(m) for m in MODELS],
            }
        ).encode()

    # -- stats ---------------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        with self._lock:
            return {"requests": self._requests, "by_model": dict(self._by_model)}

    def reset(self) -> None:
        with self._lock:
            self._requests = 0
            self._by_model.clear()
            self._fault_counts.clear()

    def _count(self, model: str | None) -> None:
        with self._lock:
            self._requests += 1
            if model is not None:
                self._by_model[model] = self._by_model.get(model, 0) + 1

    # -- lifecycle -----------------------------------------------------------------

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> int:
        """Listen and return the bound port (the real one when port is 0)."""
        self._server = await asyncio.start_server(
            self._serve_connection, host, port, limit=MAX_HEAD_BYTES, backlog=1024, reuse_address=True
        )
        return int(self._server.sockets[0].getsockname()[1])

    async def close(self) -> None:
        """Stop listening and end open connections, hung ones included."""
        if self._server is not None:
            self._server.close()
        # Python 3.11's Server.wait_closed() does not wait for connections, and a hung
        # request would never end on its own: cancel the handlers we track ourselves.
        tasks = list(self._connections)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()

    # -- HTTP ----------------------------------------------------------------------

    async def _serve_connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._connections.add(task)
        try:
            while await self._serve_request(reader, writer):
                pass
        except (ConnectionError, asyncio.IncompleteReadError):
            pass  # the client went away mid-request: nothing to answer
        except asyncio.CancelledError:
            # Only close() cancels us, and it awaits nothing but our end. Ending
            # normally keeps Python 3.11's client_connected_cb callback, which calls
            # task.exception() on cancelled tasks, from logging a bogus error.
            pass
        except RuntimeError as exc:
            if writer.is_closing():
                return  # uvloop: a write to a transport the client closed mid-stream
            logger.exception("fake-openai: request failed: %s", exc)
        except Exception:  # a bug here must not kill the whole server; say it loudly
            logger.exception("fake-openai: request failed")
            try:
                body = _error_body("fake-openai crashed, see its log", "server_error", "internal_error")
                self._write(writer, 500, body, keep_alive=False)
            except Exception:
                pass
        finally:
            self._connections.discard(task)
            writer.close()

    async def _serve_request(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        """Read and answer one request; return whether to keep the connection open."""
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except asyncio.IncompleteReadError:
            return False  # clean end of a keep-alive connection
        except asyncio.LimitOverrunError:
            self._reject(writer, 431, "Request headers too large.", "headers_too_large")
            return False
        lines = head.lstrip(b"\r\n").split(b"\r\n")
        parts = lines[0].split(b" ")
        if len(parts) != 3 or not parts[2].startswith(b"HTTP/1."):
            self._reject(writer, 400, "Malformed request line.", "bad_request")
            return False
        method, target, version = parts
        keep_alive = version == b"HTTP/1.1"
        length = 0
        chunked = expect_continue = False
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            name = name.lower()
            if name == b"content-length":
                try:
                    length = int(value)
                except ValueError:
                    length = -1
            elif name == b"transfer-encoding":
                chunked = b"chunked" in value.lower()
            elif name == b"connection":
                value = value.strip().lower()
                keep_alive = value != b"close" and (keep_alive or value == b"keep-alive")
            elif name == b"expect":
                expect_continue = value.strip().lower() == b"100-continue"

        if length < 0 or length > MAX_BODY_BYTES:
            self._reject(writer, 413, "Bad or too large Content-Length.", "body_too_large")
            return False
        if expect_continue:
            writer.write(_CONTINUE)
        if chunked:
            body = await self._read_chunked(reader)
            if body is None:
                self._reject(writer, 413, "Malformed or too large chunked body.", "bad_body")
                return False
        elif length:
            body = await reader.readexactly(length)
        else:
            body = b""

        path = target.split(b"?", 1)[0]
        if path == b"/v1/chat/completions" and method == b"POST":
            return await self._chat_completions(body, reader, writer, keep_alive)

        status, payload = self._simple_route(method, path)
        self._write(writer, status, payload, keep_alive)
        await writer.drain()
        return keep_alive

    async def _read_chunked(self, reader: asyncio.StreamReader) -> bytes | None:
        parts: list[bytes] = []
        total = 0
        while True:
            size_line = await reader.readuntil(b"\r\n")
            try:
                size = int(size_line.split(b";", 1)[0].strip(), 16)
            except ValueError:
                return None
            if size == 0:
                # Trailer fields, if any, end with an empty line.
                while await reader.readuntil(b"\r\n") != b"\r\n":
                    pass
                return b"".join(parts)
            total += size
            if total > MAX_BODY_BYTES:
                return None
            parts.append(await reader.readexactly(size))
            if await reader.readexactly(2) != b"\r\n":
                return None

    def _simple_route(self, method: bytes, path: bytes) -> tuple[int, bytes]:
        if path == b"/health" and method == b"GET":
            return 200, b'{"status":"ok"}'
        if path == b"/v1/models" and method == b"GET":
            return 200, self._models_body
        if path.startswith(b"/v1/models/") and method == b"GET":
            model = path[len(b"/v1/models/") :].decode("utf-8", "replace")
            return 200, json.dumps(_model_object(model)).encode()
        if path == b"/_stats" and method == b"GET":
            return 200, json.dumps(self.stats()).encode()
        if path == b"/_reset" and method == b"POST":
            self.reset()
            return 200, json.dumps(self.stats()).encode()
        known = path in (b"/health", b"/v1/models", b"/v1/chat/completions", b"/_stats", b"/_reset")
        readable = f"{method.decode('latin-1')} {path.decode('latin-1')}"
        if known:
            return 405, _error_body(f"Method not allowed ({readable}).", "invalid_request_error", "method_not_allowed")
        return 404, _error_body(f"Invalid URL ({readable})", "invalid_request_error", "unknown_url")

    def _reject(self, writer: asyncio.StreamWriter, status: int, message: str, code: str) -> None:
        """Answer a request we cannot read safely, and close: its framing is unknown."""
        self._write(writer, status, _error_body(message, "invalid_request_error", code), keep_alive=False)

    def _write(
        self,
        writer: asyncio.StreamWriter,
        status: int,
        body: bytes,
        keep_alive: bool,
        *,
        content_type: str = _JSON,
        extra: str = "",
        length: int | None = None,
    ) -> None:
        # One write of one bytes object per response: fewest syscalls, and TCP_NODELAY
        # (set by asyncio) sends it at once.
        close = "" if keep_alive else "connection: close\r\n"
        head = (
            f"content-type: {content_type}\r\ncontent-length: {len(body) if length is None else length}\r\n"
            f"x-request-id: req_{self._prefix}{next(self._ids):x}\r\n{extra}{close}\r\n"
        )
        writer.write(_status_line(status) + head.encode() + body)

    # -- chat completions ----------------------------------------------------------

    async def _chat_completions(
        self, body: bytes, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, keep_alive: bool
    ) -> bool:
        try:
            payload = json.loads(body)
        except (ValueError, UnicodeDecodeError) as exc:
            self._count(None)
            message = f"We could not parse the JSON body of your request. ({exc})"
            self._write(writer, 400, _error_body(message, "invalid_request_error", "invalid_json"), keep_alive)
            await writer.drain()
            return keep_alive
        model = payload.get("model") if isinstance(payload, dict) else None
        self._count(model if isinstance(model, str) else None)
        try:
            reply = plan_reply(payload, self.config)
        except _BadRequest as exc:
            self._write(writer, 400, _error_body(exc.message, "invalid_request_error", exc.code, exc.param), keep_alive)
            await writer.drain()
            return keep_alive

        if reply.fault is not None and reply.fault_times is not None:
            with self._lock:
                seen = self._fault_counts[reply.fault_key] = self._fault_counts.get(reply.fault_key, 0) + 1
            if seen > reply.fault_times:
                reply.fault = None  # recovered: answer as if there were no fault
        if reply.latency_s > 0:
            await asyncio.sleep(reply.latency_s)

        if reply.fault == "hang":
            # Answer nothing; read until the client closes (its timeout), so the task
            # ends with the connection instead of lingering. close() cancels us too.
            while await reader.read(65536):
                pass
            return False
        if reply.fault is not None and reply.fault not in _CUTS:
            status = int(reply.fault)
            type_, code, message = _FAULTS.get(status, _SERVER_FAULT)
            retry_after = reply.retry_after or ("1" if status == 429 else None)
            extra = f"retry-after: {retry_after}\r\n" if retry_after else ""
            if reply.retry_after_ms:
                extra += f"retry-after-ms: {reply.retry_after_ms}\r\n"
            self._write(writer, status, _error_body(message, type_, code), keep_alive, extra=extra)
            await writer.drain()
            return keep_alive

        completion_id = f"chatcmpl-{self._prefix}{next(self._ids):x}"
        if reply.stream:
            return await self._stream(reply, completion_id, writer, keep_alive)

        message: dict[str, Any] = {"role": "assistant", "content": reply.content, "refusal": None}
        if reply.tool_calls:
            message["tool_calls"] = [
                {"id": self._call_id(), "type": "function", "function": {"name": name, "arguments": arguments}}
                for name, arguments in reply.tool_calls
            ]
        out = json.dumps(
            {
                "id": completion_id,
                "object": "chat.completion",
                "created": int(time.time()),
                "model": reply.model,
                "system_fingerprint": "fp_fake",
                "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": reply.finish_reason}],
                "usage": self._usage(reply),
            }
        ).encode()
        if reply.fault in _CUTS:
            # Promise the whole body, deliver half, hang up: the client must see a
            # truncated response, not a short valid one.
            self._write(writer, 200, out[: len(out) // 2], False, length=len(out))
            await writer.drain()
            return False
        self._write(writer, 200, out, keep_alive)
        await writer.drain()
        return keep_alive

    def _call_id(self) -> str:
        return f"call_{self._prefix}{next(self._ids):x}"

    @staticmethod
    def _usage(reply: _Reply) -> dict[str, Any]:
        return {
            "prompt_tokens": reply.prompt_tokens,
            "completion_tokens": reply.completion_tokens,
            "total_tokens": reply.prompt_tokens + reply.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": 0},
            "completion_tokens_details": {"reasoning_tokens": 0},
        }

    async def _stream(self, reply: _Reply, completion_id: str, writer: asyncio.StreamWriter, keep_alive: bool) -> bool:
        # Every chunk shares its envelope: build it once, json.dumps only the deltas.
        head = (
            f'data: {{"id":"{completion_id}","object":"chat.completion.chunk","created":{int(time.time())},'
            f'"model":{json.dumps(reply.model)},"system_fingerprint":"fp_fake","choices":[{{"index":0,"delta":'
        )
        # OpenAI sends "usage": null on every chunk when include_usage is on.
        usage_null = ',"usage":null' if reply.include_usage else ""
        tail = f',"logprobs":null,"finish_reason":null}}]{usage_null}}}\n\n'

        events: list[str] = []
        if reply.tool_calls:
            for index, (name, arguments) in enumerate(reply.tool_calls):
                header = {
                    "index": index,
                    "id": self._call_id(),
                    "type": "function",
                    "function": {"name": name, "arguments": ""},
                }
                # Like OpenAI: the first call's header rides on the role chunk.
                delta: dict[str, Any] = {"tool_calls": [header]}
                if index == 0:
                    delta = {"role": "assistant", "content": None, **delta}
                events.append(head + json.dumps(delta) + tail)
                for fragment in _fragments(arguments):
                    delta = {"tool_calls": [{"index": index, "function": {"arguments": fragment}}]}
                    events.append(head + json.dumps(delta) + tail)
        else:
            events.append(head + '{"role":"assistant","content":""}' + tail)
            tokens = _TOKEN_RE.findall(reply.content or "")
            events.extend(f'{head}{{"content":{json.dumps(token)}}}{tail}' for token in tokens)

        finish = f'{head}{{}},"logprobs":null,"finish_reason":"{reply.finish_reason}"}}]{usage_null}}}\n\n'
        cut = reply.fault if reply.fault in _CUTS else None
        payloads: list[bytes]
        if cut is None:
            events.append(finish)
            if reply.include_usage:
                envelope = head[len("data: ") : head.index(',"choices"')]
                events.append(f'data: {envelope},"choices":[],"usage":{json.dumps(self._usage(reply))}}}\n\n')
            payloads = [event.encode() for event in events]
            payloads.append(_DONE_EVENT)
        elif cut == "cut-after-finish":
            payloads = [event.encode() for event in [*events, finish]]
        else:
            rest = [*events[reply.cut_after :], finish]
            payloads = [event.encode() for event in events[: reply.cut_after]]
            if cut == "cut-event":
                half = rest[0].encode()
                payloads.append(half[: len(half) // 2])  # mid-JSON, no blank line
        # How the body ends: properly (the last chunk), or not at all (the connection closes mid-body).
        ending = _LAST_CHUNK if cut in (None, "cut-clean", "cut-event") else b""

        keep_alive = keep_alive and cut is None
        self._write_stream_head(writer, keep_alive)
        if reply.gap_s <= 0:
            # No pacing asked: one write for the whole stream, each event its own chunk.
            writer.write(b"".join(_http_chunk(p) for p in payloads) + ending)
            await writer.drain()
        else:
            for i, p in enumerate(payloads):
                if i:
                    await asyncio.sleep(reply.gap_s)
                writer.write(_http_chunk(p))
                # drain() raises once the client is gone, which ends the stream early
                # (what a cancelled request should cost an upstream).
                await writer.drain()
            if ending:
                writer.write(ending)
                await writer.drain()
        return keep_alive  # a cut closes the connection: closing the socket mid-body is the fault

    def _write_stream_head(self, writer: asyncio.StreamWriter, keep_alive: bool) -> None:
        close = "" if keep_alive else "connection: close\r\n"
        head = (
            f"content-type: {_SSE}\r\ncache-control: no-cache\r\ntransfer-encoding: chunked\r\n"
            f"x-request-id: req_{self._prefix}{next(self._ids):x}\r\n{close}\r\n"
        )
        writer.write(_status_line(200) + head.encode())


def _http_chunk(payload: bytes) -> bytes:
    return b"%x\r\n%b\r\n" % (len(payload), payload)


def _fragments(arguments: str, size: int = 8) -> list[str]:
    """Split the arguments JSON as a model streams it: small pieces, at least two."""
    if len(arguments) < 2:
        return [arguments]
    size = min(size, len(arguments) // 2)
    return [arguments[i : i + size] for i in range(0, len(arguments), size)]


class FakeOpenAIServer:
    """FakeOpenAI on a free port, in a background thread with its own event loop.

    ``with FakeOpenAIServer() as server:`` starts it (returning once the socket
    listens) and stops it on exit. ``stats()`` and ``reset()`` act in-process.
    """

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        latency_ms: float = 0.0,
        token_gap_ms: float = 0.0,
        tokens: int = 0,
    ) -> None:
        self.host = host
        self.port = port
        self.app = FakeOpenAI(FakeConfig(latency_ms=latency_ms, token_gap_ms=token_gap_ms, tokens=tokens))
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._stopping = asyncio.Event()  # set from the test thread via call_soon_threadsafe
        self._error: BaseException | None = None
        self._stop_lock = threading.Lock()

    @property
    def url(self) -> str:
        """Root URL, for /health, /_stats and /_reset."""
        return f"http://{_url_host(self.host)}:{self.port}"

    @property
    def base_url(self) -> str:
        """OpenAI base URL (what ``openai.OpenAI(base_url=...)`` takes)."""
        return f"{self.url}/v1"

    def stats(self) -> dict[str, Any]:
        return self.app.stats()

    def reset(self) -> None:
        self.app.reset()

    def start(self, timeout: float = 10.0) -> Self:
        if self._thread is not None:
            return self
        self._ready, self._stopping, self._error = threading.Event(), asyncio.Event(), None
        self._thread = threading.Thread(target=self._run, name="fake-openai", daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout):
            raise RuntimeError("fake-openai did not start in time")
        if self._error is not None:
            self._thread.join()
            self._thread = None
            raise RuntimeError("fake-openai failed to start") from self._error
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Close the socket and every open connection, then end the thread (idempotent)."""
        with self._stop_lock:  # a test may stop from a timer thread and in its teardown
            thread, loop = self._thread, self._loop
            if thread is None or loop is None:
                return
            try:
                loop.call_soon_threadsafe(self._stopping.set)
            except RuntimeError:
                pass  # the loop already ended
            thread.join(timeout)
            self._thread = None

    def _run(self) -> None:
        loop = _new_event_loop()
        self._loop = loop
        asyncio.set_event_loop(loop)
        try:
            loop.run_until_complete(self._main())
        finally:
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()

    async def _main(self) -> None:
        try:
            self.port = await self.app.start(self.host, self.port)
        except BaseException as exc:
            self._error = exc
            self._ready.set()
            return
        self._ready.set()
        try:
            await self._stopping.wait()
        finally:
            await self.app.close()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m agentplatform.testing.fake_openai",
        description="Fake OpenAI-compatible upstream for tests and benchmarks (directives: see the module docstring).",
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9100, help="0 picks a free port")
    parser.add_argument("--latency-ms", type=float, default=0.0, help="delay before every response")
    parser.add_argument("--token-gap-ms", type=float, default=0.0, help="delay between stream chunks")
    parser.add_argument(
        "--tokens", type=int, default=0, help="reply with N words unless a directive says otherwise; 0 = echo"
    )
    args = parser.parse_args(argv)
    if args.latency_ms < 0 or args.token_gap_ms < 0 or args.tokens < 0:
        parser.error("--latency-ms, --token-gap-ms and --tokens must be >= 0")

    async def serve() -> None:
        app = FakeOpenAI(FakeConfig(latency_ms=args.latency_ms, token_gap_ms=args.token_gap_ms, tokens=args.tokens))
        port = await app.start(args.host, args.port)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, stop.set)
        print(f"fake-openai listening on http://{_url_host(args.host)}:{port}/v1", flush=True)
        try:
            await stop.wait()
        finally:
            await app.close()

    with asyncio.Runner(loop_factory=_new_event_loop) as runner:
        runner.run(serve())
    return 0


if __name__ == "__main__":
    sys.exit(main())

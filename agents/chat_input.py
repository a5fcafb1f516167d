"""The chat input: the one place that says what a chat turn accepts, on every transport.

REST (`POST /api/v1/agents/{name}/chat`, JSON or SSE), async runs (`POST
/api/v1/agents/{name}/runs`: REST's body without `stream`, plus `callback_url`), the
OpenAI-compatible endpoint (`POST /v1/chat/completions`) and WebSocket `message` frames differ
only in their envelope; each turns its body into a ChatInput here and nowhere else:

    data = rest_chat_input(body)      # or async_run_input, openai_chat_input, websocket_chat_input
    ChatTurn(..., input_messages=data.messages, metadata=data.metadata, ...)

The body itself comes from agentplatform.jsonparse.loads_strict (NaN/Infinity, numbers that
overflow, nesting deeper than 64, lone surrogates and NUL characters — which PostgreSQL cannot
store: a run that could not be stored after the model answered — are refused there, as
`invalid_json`). What holds here, for all three:
  * a message's content is a string or a list of text parts (`{"type": "text", "text": str}`);
    it leaves here as ONE string (parts joined by newlines), so nothing downstream (guards,
    budget estimates, providers, the transcript) converts content again;
  * text is at most MAX_MESSAGE_CHARS characters;
  * at most MAX_MESSAGES_PER_REQUEST messages;
  * metadata is an object of at most MAX_METADATA_BYTES, measured as compact UTF-8 JSON;
  * unknown fields are refused, naming the first one.
Every refusal is an InvalidRequest (400) whose `param` names the field, before the model is
called and before any stage (rate limits, budgets) counts the turn.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from typing import Any

from django.conf import settings

from agentplatform.errors import InvalidRequest

from .skills.base import SkillError
from .skills.outbound import http_url

MAX_METADATA_BYTES = 16_384
MAX_IDEMPOTENCY_KEY = 255
MAX_NAME_CHARS = 64
MAX_TOOL_CALL_ID_CHARS = 128
MAX_USER_CHARS = 256

_compact = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode

REST_FIELDS = frozenset({"message", "messages", "session_id", "stream", "metadata"})
ASYNC_RUN_FIELDS = frozenset({"message", "messages", "session_id", "metadata", "callback_url"})
MAX_CALLBACK_URL_CHARS = 2000  # Run.callback_url's column
WEBSOCKET_FIELDS = frozenset({"type", "content", "session_id", "idempotency_key", "metadata"})
OPENAI_FIELDS = frozenset({"model", "messages", "stream", "stream_options", "temperature", "max_tokens",
                           "max_completion_tokens", "user", "metadata"})
# Accepted for compatibility with OpenAI clients and ignored: the agent's own skills and settings apply.
OPENAI_IGNORED = frozenset({
    "tools", "tool_choice", "top_p", "n", "presence_penalty", "frequency_penalty", "logit_bias", "seed", "stop",
    "response_format", "parallel_tool_calls", "logprobs", "top_logprobs", "store", "service_tier", "modalities",
    "reasoning_effort", "prediction", "audio", "functions", "function_call", "web_search_options", "verbosity",
    "prompt_cache_key", "safety_identifier"})
REST_ROLES = ("system", "user", "assistant")
OPENAI_ROLES = ("system", "developer", "user", "assistant", "tool")


@dataclass(slots=True)
class ChatInput:
    """A validated chat turn's input. `messages` are {"role", "content": str, ...} with content
    already folded to text; `has_session` tells an explicit `"session_id": null` from none."""

    messages: list[dict]
    session_id: uuid.UUID | None = None
    has_session: bool = False
    stream: bool = False
    include_usage: bool = False
    metadata: dict = field(default_factory=dict)
    temperature: float | None = None
    max_tokens: int | None = None
    model: str | None = None
    idempotency_key: str | None = None
    callback_url: str | None = None


def invalid(param: str, message: str, code: str = "invalid_field") -> InvalidRequest:
    return InvalidRequest(f"{param}: {message}", code=code, param=param)


# --- the pieces -------------------------------------------------------------------------------


def _object(body: Any, what: str) -> dict:
    if not isinstance(body, dict):
        raise InvalidRequest(f"The {what} must be a JSON object.", code="invalid_json")
    return body


def _no_unknown(body: dict, allowed: frozenset) -> None:
    unknown = [name for name in body if name not in allowed]
    if unknown:
        raise invalid(sorted(unknown)[0], "Unknown field.")


def checked_text(value: str, param: str) -> str:
    if len(value) > settings.MAX_MESSAGE_CHARS:
        raise invalid(param, f"Longer than {settings.MAX_MESSAGE_CHARS} characters.")
    return value


def content_text(content: Any, param: str, *, required: bool) -> str | None:
    """The content as one string: a string, or a list of text parts joined by newlines. None
    (or absent) only where not `required`."""
    if isinstance(content, str):
        if required and not content:
            raise invalid(param, "A non-empty string or list of text parts is required.")
        return checked_text(content, param)
    if content is None:
        if required:
            raise invalid(param, "A non-empty string or list of text parts is required.")
        return None
    if not isinstance(content, list) or (required and not content):
        raise invalid(param, "A string or a list of content parts.")
    texts = []
    for index, part in enumerate(content):
        where = f"{param}[{index}]"
        if not isinstance(part, dict):
            raise invalid(where, "A content part must be an object.")
        if part.get("type", "text") != "text":
            raise invalid(f"{where}.type", "Only text parts (`\"type\": \"text\"`) are supported.")
        unknown = [k for k in part if k not in ("type", "text")]
        if unknown:
            raise invalid(f"{where}.{sorted(unknown)[0]}", "Unknown field.")
        text = part.get("text")
        if not isinstance(text, str):
            raise invalid(f"{where}.text", "Must be a string.")
        texts.append(text)
    text = "\n".join(texts)
    if required and not text:
        raise invalid(param, "A non-empty string or list of text parts is required.")
    return checked_text(text, param)


def metadata_of(value: Any, param: str = "metadata") -> dict:
    """Metadata: a JSON object of at most MAX_METADATA_BYTES (compact UTF-8 JSON)."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise invalid(param, "Must be a JSON object.")
    try:
        encoded = _compact(value)
        size = len(encoded) if len(encoded) * 4 <= MAX_METADATA_BYTES else len(encoded.encode())
    except (TypeError, ValueError, RecursionError):  # not JSON data, NaN, lone surrogates, too deep
        raise invalid(param, "Must be JSON data.") from None
    if size > MAX_METADATA_BYTES:
        raise invalid(param, f"At most {MAX_METADATA_BYTES // 1024} KiB of metadata (as compact UTF-8 JSON).")
    return value


def _session_id(body: dict) -> tuple[uuid.UUID | None, bool]:
    if "session_id" not in body:
        return None, False
    value = body["session_id"]
    if value is None:
        return None, True
    if isinstance(value, str) and len(value) <= 64:
        try:
            return uuid.UUID(value), True
        except ValueError:
            pass
    raise invalid("session_id", "Must be a valid UUID.")


def _boolean(body: dict, name: str) -> bool:
    value = body.get(name, False)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise invalid(name, "Must be a boolean.")
    return value


def _string(body: dict, name: str, limit: int) -> str | None:
    value = body.get(name)
    if value is None:
        return None
    if not isinstance(value, str) or len(value) > limit:
        raise invalid(name, f"A string of at most {limit} characters.")
    return checked_text(value, name)


def _message_count(messages: Any, param: str = "messages") -> list:
    if not isinstance(messages, list) or not messages:
        raise invalid(param, "A non-empty list of messages is required.")
    if len(messages) > settings.MAX_MESSAGES_PER_REQUEST:
        raise invalid(param, f"At most {settings.MAX_MESSAGES_PER_REQUEST} messages.")
    return messages


def idempotency_key_of(value: Any, param: str) -> str | None:
    """1-255 printable ASCII characters, as the Idempotency-Key header."""
    if value is None:
        return None
    if not isinstance(value, str) or not 1 <= len(value) <= MAX_IDEMPOTENCY_KEY or not all(" " <= c <= "~"
                                                                                            for c in value):
        raise invalid(param, f"Must be 1-{MAX_IDEMPOTENCY_KEY} printable ASCII characters.",
                      code="invalid_idempotency_key")
    return value


# --- the transports' envelopes ------------------------------------------------------------------


def rest_chat_input(body: Any) -> ChatInput:
    """`{message | messages, session_id?, stream?, metadata?}`: new messages for a session, the
    last one from the user."""
    return _session_turn(body, REST_FIELDS)


def async_run_input(body: Any) -> ChatInput:
    """`{message | messages, session_id?, metadata?, callback_url?}`: REST chat's input, run later.
    `callback_url` is an absolute http(s) URL without credentials; where it points (public
    addresses only) is agents.runs' check, which resolves the name."""
    data = _session_turn(body, ASYNC_RUN_FIELDS)
    raw = body.get("callback_url")
    if raw is not None:
        try:
            data.callback_url = str(http_url(raw, max_chars=MAX_CALLBACK_URL_CHARS, what="callback_url"))
        except SkillError as exc:
            text = str(exc).removeprefix("callback_url ")  # "callback_url: must be ..." reads once
            raise invalid("callback_url", text[:1].upper() + text[1:] + ".") from None
    return data


def _session_turn(body: Any, allowed: frozenset) -> ChatInput:
    body = _object(body, "JSON body")
    _no_unknown(body, allowed)
    if ("message" in body) == ("messages" in body):
        raise invalid("message", "Give exactly one of `message` or `messages`.")
    if "message" in body:
        messages = [{"role": "user", "content": content_text(body["message"], "message", required=True)}]
    else:
        messages = []
        for index, m in enumerate(_message_count(body["messages"])):
            where = f"messages[{index}]"
            if not isinstance(m, dict):
                raise invalid(where, "Must be an object.")
            _no_unknown_in(m, ("role", "content"), where)
            if m.get("role") not in REST_ROLES:
                raise invalid(f"{where}.role", f"Must be one of {', '.join(REST_ROLES)}.")
            messages.append({"role": m["role"], "content": content_text(m.get("content"), f"{where}.content",
                                                                         required=True)})
        if messages[-1]["role"] != "user":
            raise invalid("messages", "The last message must be from the user.")
    session_id, has_session = _session_id(body)
    return ChatInput(messages=messages, session_id=session_id, has_session=has_session,
                     stream=_boolean(body, "stream"), metadata=metadata_of(body.get("metadata")))


def websocket_chat_input(frame: dict) -> ChatInput:
    """A `message` frame: `{type, content, session_id?, idempotency_key?, metadata?}`."""
    _no_unknown(frame, WEBSOCKET_FIELDS)
    session_id, has_session = _session_id(frame)
    return ChatInput(messages=[{"role": "user", "content": content_text(frame.get("content"), "content",
                                                                        required=True)}],
                     session_id=session_id, has_session=has_session, stream=True,
                     metadata=metadata_of(frame.get("metadata")),
                     idempotency_key=idempotency_key_of(frame.get("idempotency_key"), "idempotency_key"))


def openai_chat_input(body: Any) -> ChatInput:
    """A Chat Completions body; `model` is the agent's name. `developer` messages become
    `system` ones; the whole conversation comes with each request (no stored session)."""
    body = _object(body, "JSON body")
    unknown = [name for name in body if name not in OPENAI_FIELDS and name not in OPENAI_IGNORED]
    if unknown:
        raise invalid(sorted(unknown)[0], "Unknown field.")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise invalid("model", "This field is required (the agent's name)." if model is None else "Must be a string.")
    messages = []
    for index, m in enumerate(_message_count(body.get("messages"))):
        messages.append(_openai_message(m, f"messages[{index}]"))
    options = body.get("stream_options")
    include_usage = False
    if options is not None:
        if not isinstance(options, dict) or set(options) - {"include_usage", "include_obfuscation"} \
                or not isinstance(options.get("include_usage", False), bool):
            raise invalid("stream_options", "An object with a boolean include_usage.")
        include_usage = options.get("include_usage", False)
    temperature = body.get("temperature")
    if temperature is not None:
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not 0 <= temperature <= 2:
            raise invalid("temperature", "A number from 0 to 2.")
        temperature = float(temperature)
    max_tokens = None
    for name in ("max_completion_tokens", "max_tokens"):
        value = body.get(name)
        if value is not None:
            if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 2**31 - 1:
                raise invalid(name, "A positive integer (at most 2147483647).")
            max_tokens = max_tokens or value
    _string(body, "user", MAX_USER_CHARS)
    return ChatInput(messages=messages, model=model, stream=_boolean(body, "stream"), include_usage=include_usage,
                     metadata=metadata_of(body.get("metadata")), temperature=temperature, max_tokens=max_tokens)


def _no_unknown_in(m: dict, allowed: tuple, where: str) -> None:
    unknown = [k for k in m if k not in allowed]
    if unknown:
        raise invalid(f"{where}.{sorted(unknown)[0]}", "Unknown field.")


# `refusal`, `audio` and `function_call` come back in assistant messages that clients replay: ignored.
_OPENAI_MESSAGE_FIELDS = ("role", "content", "name", "tool_calls", "tool_call_id", "refusal", "audio",
                          "function_call")


def _openai_message(m: Any, where: str) -> dict:
    if not isinstance(m, dict):
        raise invalid(where, "Must be an object.")
    _no_unknown_in(m, _OPENAI_MESSAGE_FIELDS, where)
    role = m.get("role")
    if role not in OPENAI_ROLES:
        raise invalid(f"{where}.role", f"Must be one of {', '.join(sorted(OPENAI_ROLES))}.")
    out: dict[str, Any] = {"role": "system" if role == "developer" else role,
                           "content": content_text(m.get("content"), f"{where}.content", required=False) or ""}
    for name, limit in (("name", MAX_NAME_CHARS), ("tool_call_id", MAX_TOOL_CALL_ID_CHARS)):
        value = m.get(name)
        if value is not None:
            if not isinstance(value, str) or len(value) > limit:
                raise invalid(f"{where}.{name}", f"A string of at most {limit} characters.")
            if value:
                out[name] = checked_text(value, f"{where}.{name}")
    calls = m.get("tool_calls")
    if calls is not None:
        if role != "assistant" or not isinstance(calls, list):
            raise invalid(f"{where}.tool_calls", "A list of tool calls, on assistant messages only.")
        out_calls = [_tool_call(call, f"{where}.tool_calls[{i}]") for i, call in enumerate(calls)]
        if out_calls:
            out["tool_calls"] = out_calls
    if role == "tool" and "tool_call_id" not in out:
        raise invalid(f"{where}.tool_call_id", "A tool message answers a tool call: give its id.")
    return out


def _tool_call(call: Any, where: str) -> dict:
    """`{id, type: "function", function: {name, arguments}}` as OpenAI sends it back."""
    if not isinstance(call, dict):
        raise invalid(where, "Must be an object.")
    function = call.get("function")
    call_id = call.get("id")
    if not isinstance(call_id, str) or not call_id or len(call_id) > MAX_TOOL_CALL_ID_CHARS:
        raise invalid(f"{where}.id", f"A string of 1-{MAX_TOOL_CALL_ID_CHARS} characters.")
    if call.get("type", "function") != "function" or not isinstance(function, dict):
        raise invalid(f"{where}.function", "A function call: {name, arguments}.")
    name, arguments = function.get("name"), function.get("arguments", "")
    if not isinstance(name, str) or not name or len(name) > MAX_NAME_CHARS:
        raise invalid(f"{where}.function.name", f"A string of 1-{MAX_NAME_CHARS} characters.")
    if not isinstance(arguments, str):
        raise invalid(f"{where}.function.arguments", "JSON text, as a string.")
    return {"id": checked_text(call_id, f"{where}.id"), "type": "function",
            "function": {"name": checked_text(name, f"{where}.function.name"),
                         "arguments": checked_text(arguments, f"{where}.function.arguments")}}

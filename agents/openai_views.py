"""The OpenAI-compatible endpoint: any OpenAI client talks to an agent by using its name as
`model` (base_url http://host/v1). The agent's system prompt, skills and model apply; its tool
calls run here, so the client sees only the answer. Errors keep OpenAI's shape."""

from __future__ import annotations

import json
import time

from django.conf import settings
from django.http import JsonResponse, StreamingHttpResponse
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiResponse, extend_schema
from rest_framework import serializers
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from agentplatform.asyncviews import AsyncAPIView, client_ip, parse_json_body, require_principal, with_headers
from agentplatform.errors import InvalidRequest, NotFound, PlatformError
from governance.idempotency import idempotent
from governance.selectors import presented_key

from .pipeline import ChatTurn, authorize_agent, chat_complete, principal_and_agent
from .selectors import visible_agents
from .streaming import with_heartbeats


class OpenAIMessageSerializer(serializers.Serializer):
    role = serializers.ChoiceField(choices=["system", "developer", "user", "assistant", "tool"])
    content = serializers.JSONField(required=False, allow_null=True)
    name = serializers.CharField(required=False, max_length=64)
    tool_calls = serializers.ListField(child=serializers.DictField(), required=False)
    tool_call_id = serializers.CharField(required=False, max_length=128)

    def validate_content(self, value):
        if value is None or isinstance(value, str):
            text = value or ""
        elif isinstance(value, list) and all(isinstance(p, dict) for p in value):
            text = " ".join(str(p.get("text", "")) for p in value)
        else:
            raise serializers.ValidationError("A string or a list of content parts.")
        if len(text) > settings.MAX_MESSAGE_CHARS:
            raise serializers.ValidationError(f"Longer than {settings.MAX_MESSAGE_CHARS} characters.")
        return value


class StreamOptionsSerializer(serializers.Serializer):
    include_usage = serializers.BooleanField(required=False, default=False)


class ChatCompletionRequestSerializer(serializers.Serializer):
    model = serializers.CharField(help_text="The agent's name.")
    messages = OpenAIMessageSerializer(many=True)
    stream = serializers.BooleanField(required=False, default=False)
    stream_options = StreamOptionsSerializer(required=False, allow_null=True)
    temperature = serializers.FloatField(required=False, allow_null=True, min_value=0, max_value=2)
    max_tokens = serializers.IntegerField(required=False, allow_null=True, min_value=1)
    max_completion_tokens = serializers.IntegerField(required=False, allow_null=True, min_value=1)
    user = serializers.CharField(required=False, max_length=256)
    metadata = serializers.DictField(required=False)
    # Accepted for compatibility and ignored: the agent's own skills and settings apply.
    IGNORED = {"tools", "tool_choice", "top_p", "n", "presence_penalty", "frequency_penalty", "logit_bias",
               "seed", "stop", "response_format", "parallel_tool_calls", "logprobs", "top_logprobs", "store",
               "service_tier", "modalities", "reasoning_effort", "prediction", "audio", "functions",
               "function_call", "web_search_options", "verbosity", "prompt_cache_key", "safety_identifier"}

    def validate_messages(self, value: list) -> list:
        if not value:
            raise serializers.ValidationError("Give at least one message.")
        if len(value) > settings.MAX_MESSAGES_PER_REQUEST:
            raise serializers.ValidationError(f"At most {settings.MAX_MESSAGES_PER_REQUEST} messages.")
        return value

    def validate(self, attrs: dict) -> dict:
        unknown = set(self.initial_data) - set(self.fields) - self.IGNORED
        if unknown:
            raise serializers.ValidationError({sorted(unknown)[0]: "Unknown field."})
        return attrs


_FIELDS = None
_ROLES = {"system", "developer", "user", "assistant", "tool"}


def _invalid(param: str, message: str) -> InvalidRequest:
    return InvalidRequest(f"{param}: {message}", code="invalid_field", param=param)


def validate_chat_completion(body: dict) -> dict:
    """Validate a Chat Completions body: the rules of ChatCompletionRequestSerializer (which
    documents them in the schema) without building a serializer per request on the hot path."""
    global _FIELDS
    if _FIELDS is None:
        _FIELDS = set(ChatCompletionRequestSerializer().fields) | ChatCompletionRequestSerializer.IGNORED
    unknown = set(body) - _FIELDS
    if unknown:
        raise _invalid(sorted(unknown)[0], "Unknown field.")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise _invalid("model", "This field is required (the agent's name)." if model is None else "Must be a string.")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _invalid("messages", "A non-empty list of messages is required.")
    if len(messages) > settings.MAX_MESSAGES_PER_REQUEST:
        raise _invalid("messages", f"At most {settings.MAX_MESSAGES_PER_REQUEST} messages.")
    limit = settings.MAX_MESSAGE_CHARS
    for index, m in enumerate(messages):
        where = f"messages[{index}]"
        if not isinstance(m, dict):
            raise _invalid(where, "Must be an object.")
        if not isinstance(m.get("role"), str) or m["role"] not in _ROLES:  # {} is unhashable: a TypeError
            raise _invalid(f"{where}.role", f"Must be one of {', '.join(sorted(_ROLES))}.")
        content = m.get("content")
        if content is None or isinstance(content, str):
            text = content or ""
        elif isinstance(content, list) and all(isinstance(p, dict) for p in content):
            text = " ".join(str(p.get("text", "")) for p in content)
        else:
            raise _invalid(f"{where}.content", "A string or a list of content parts.")
        if len(text) > limit:
            raise _invalid(f"{where}.content", f"Longer than {limit} characters.")
        if "tool_calls" in m and not (isinstance(m["tool_calls"], list)
                                      and all(isinstance(t, dict) for t in m["tool_calls"])):
            raise _invalid(f"{where}.tool_calls", "A list of tool calls.")
        for name in ("name", "tool_call_id"):
            if name in m and not isinstance(m[name], str):
                raise _invalid(f"{where}.{name}", "Must be a string.")
    data = {"model": model, "messages": messages}
    for name in ("stream",):
        value = body.get(name, False)
        if not isinstance(value, bool):
            raise _invalid(name, "Must be a boolean.")
        data[name] = value
    options = body.get("stream_options")
    if options is not None:
        if not isinstance(options, dict) or not isinstance(options.get("include_usage", False), bool):
            raise _invalid("stream_options", "An object with a boolean include_usage.")
        data["stream_options"] = options
    temperature = body.get("temperature")
    if temperature is not None:
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not 0 <= temperature <= 2:
            raise _invalid("temperature", "A number from 0 to 2.")
        data["temperature"] = float(temperature)
    for name in ("max_tokens", "max_completion_tokens"):
        value = body.get(name)
        if value is not None:
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise _invalid(name, "A positive integer.")
            data[name] = value
    metadata = body.get("metadata")
    if metadata is not None:
        if not isinstance(metadata, dict):
            raise _invalid("metadata", "Must be an object.")
        data["metadata"] = metadata
    if "user" in body and not isinstance(body["user"], str):
        raise _invalid("user", "Must be a string.")
    return data


def _message(m: dict) -> dict:
    out = {"role": "system" if m["role"] == "developer" else m["role"], "content": m.get("content")}
    for extra in ("name", "tool_calls", "tool_call_id"):
        if m.get(extra):
            out[extra] = m[extra]
    return out


def _completion_id(turn: ChatTurn) -> str:
    return f"chatcmpl-{turn.run_id.hex}"


class ChatCompletionsView(AsyncAPIView):
    @extend_schema(
        operation_id="openai_chat_completions",
        request=ChatCompletionRequestSerializer,
        responses={200: OpenApiTypes.OBJECT, 400: OpenApiResponse(description="Invalid body."),
                   401: OpenApiResponse(description="Missing or invalid API key."),
                   404: OpenApiResponse(description="No agent of that name (`model_not_found`).")},
        description="OpenAI Chat Completions wire format; `model` is an agent's name. Streams with `stream: true` "
                    "(`stream_options.include_usage` adds the final usage chunk).",
    )
    async def post(self, request):
        body = parse_json_body(request)
        name = body.get("model") if isinstance(body.get("model"), str) else None
        principal, agent = await principal_and_agent(presented_key(request.headers), name)
        require_principal(principal)
        return await idempotent(request, principal, lambda: self._complete(request, principal, agent, body))

    async def _complete(self, request, principal, agent, body):
        data = validate_chat_completion(body)
        try:
            agent = authorize_agent(principal, agent, data["model"])
        except NotFound:
            raise NotFound(f"The model `{data['model']}` does not exist or you do not have access to it.",
                           code="model_not_found", param="model") from None
        max_tokens = data.get("max_completion_tokens") or data.get("max_tokens")
        turn = ChatTurn(principal=principal, agent=agent, input_messages=[_message(m) for m in data["messages"]],
                        transport="openai", stream=data["stream"], request_id=request.request_id,
                        use_session=False, metadata=data.get("metadata") or {},
                        temperature=data.get("temperature"), client_ip=client_ip(request),
                        max_tokens=min(max_tokens, agent.max_tokens) if max_tokens else None)
        await turn.prepare()
        if not data["stream"]:
            result = await chat_complete(turn)
            return with_headers(JsonResponse({
                "id": _completion_id(turn), "object": "chat.completion", "created": int(time.time()),
                "model": agent.name,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": result["output"],
                                                     "refusal": None},
                             "finish_reason": turn.run.finish_reason or "stop", "logprobs": None}],
                "usage": result["usage"],
                "cost_usd": result["cost_usd"],
                "system_fingerprint": None,
            }), turn.response_headers)
        include_usage = bool((data.get("stream_options") or {}).get("include_usage"))
        response = StreamingHttpResponse(with_heartbeats(_openai_stream(turn, include_usage),
                                                         settings.SSE_HEARTBEAT_SECONDS),
                                         content_type="text/event-stream")
        response["Cache-Control"] = "no-cache"
        response["X-Accel-Buffering"] = "no"
        return with_headers(response, turn.response_headers)


async def _openai_stream(turn: ChatTurn, include_usage: bool):
    base = {"id": _completion_id(turn), "object": "chat.completion.chunk", "created": int(time.time()),
            "model": turn.agent.name, "system_fingerprint": None}
    dumps = json.dumps

    def chunk(delta: dict, finish_reason=None) -> bytes:
        payload = {**base, "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason,
                                        "logprobs": None}]}
        return b"data: " + dumps(payload, separators=(",", ":")).encode() + b"\n\n"

    yield chunk({"role": "assistant", "content": ""})
    async for event in turn.events():
        kind = event["type"]
        if kind == "delta":
            yield chunk({"content": event["content"]})
        elif kind == "done":
            yield chunk({}, event.get("finish_reason") or "stop")
            if include_usage:
                payload = {**base, "choices": [], "usage": turn.run.usage.as_dict()}
                yield b"data: " + dumps(payload, separators=(",", ":")).encode() + b"\n\n"
        elif kind == "error":
            err = turn.run.error or PlatformError(event["message"], code=event["code"])
            yield b"data: " + dumps({"error": err.as_dict(turn.request_id)}).encode() + b"\n\n"
    yield b"data: [DONE]\n\n"


def _model_payload(agent) -> dict:
    return {"id": agent.name, "object": "model", "created": int(agent.created_at.timestamp()),
            "owned_by": "agent-platform", "description": agent.description}


class ModelListView(APIView):
    pagination_class = None

    @extend_schema(operation_id="openai_models_list", responses={200: OpenApiTypes.OBJECT})
    def get(self, request: Request) -> Response:
        return Response({"object": "list", "data": [_model_payload(a) for a in visible_agents(request.user)
                                                    .order_by("name")]})


class ModelDetailView(APIView):
    @extend_schema(operation_id="openai_models_retrieve", responses={200: OpenApiTypes.OBJECT})
    def get(self, request: Request, name: str) -> Response:
        agent = visible_agents(request.user).filter(name=name).first()
        if agent is None:
            raise NotFound(f"The model `{name}` does not exist or you do not have access to it.",
                           code="model_not_found", param="model")
        return Response(_model_payload(agent))

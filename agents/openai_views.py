"""The OpenAI-compatible endpoint: any OpenAI client talks to an agent by using its name as
`model` (base_url http://host/v1). The agent's system prompt, skills and model apply; its tool
calls run here, so the client sees only the answer. Errors keep OpenAI's shape."""

from __future__ import annotations

import time

from django.http import JsonResponse
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiResponse, extend_schema
from rest_framework import serializers
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from agentplatform.asyncviews import AsyncAPIView, client_ip, parse_json_body, require_principal, with_headers
from agentplatform.errors import NotFound
from governance.idempotency import idempotent
from governance.selectors import presented_key

from .chat_input import OPENAI_ROLES, openai_chat_input
from .pipeline import ChatTurn, authorize_agent, chat_complete, principal_and_agent
from .selectors import visible_agents
from .streaming import completion_id, openai_stream, stream_response


class OpenAIMessageSerializer(serializers.Serializer):
    """Documentation only (the OpenAPI schema): agents.chat_input validates."""

    role = serializers.ChoiceField(choices=list(OPENAI_ROLES))
    content = serializers.JSONField(required=False, allow_null=True,
                                    help_text="A string or a list of text parts `{type: text, text}`.")
    name = serializers.CharField(required=False, max_length=64)
    tool_calls = serializers.ListField(child=serializers.DictField(), required=False)
    tool_call_id = serializers.CharField(required=False, max_length=128)


class StreamOptionsSerializer(serializers.Serializer):
    include_usage = serializers.BooleanField(required=False, default=False)


class ChatCompletionRequestSerializer(serializers.Serializer):
    """Documentation only (the OpenAPI schema): agents.chat_input.openai_chat_input validates.
    Also accepted and ignored: agents.chat_input.OPENAI_IGNORED."""

    model = serializers.CharField(help_text="The agent's name.")
    messages = OpenAIMessageSerializer(many=True)
    stream = serializers.BooleanField(required=False, default=False)
    stream_options = StreamOptionsSerializer(required=False, allow_null=True)
    temperature = serializers.FloatField(required=False, allow_null=True, min_value=0, max_value=2)
    max_tokens = serializers.IntegerField(required=False, allow_null=True, min_value=1, max_value=2**31 - 1)
    max_completion_tokens = serializers.IntegerField(required=False, allow_null=True, min_value=1,
                                                     max_value=2**31 - 1)
    user = serializers.CharField(required=False, max_length=256)
    metadata = serializers.DictField(required=False, help_text="At most 16 KiB as compact UTF-8 JSON.")


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
        data = openai_chat_input(body)
        try:
            agent = authorize_agent(principal, agent, data.model)
        except NotFound:
            raise NotFound(f"The model `{data.model}` does not exist or you do not have access to it.",
                           code="model_not_found", param="model") from None
        turn = ChatTurn(principal=principal, agent=agent, input_messages=data.messages,
                        transport="openai", stream=data.stream, request_id=request.request_id,
                        use_session=False, metadata=data.metadata, temperature=data.temperature,
                        client_ip=client_ip(request),
                        max_tokens=min(data.max_tokens, agent.max_tokens) if data.max_tokens else None)
        await turn.prepare()
        if not data.stream:
            result = await chat_complete(turn)
            return with_headers(JsonResponse({
                "id": completion_id(turn), "object": "chat.completion", "created": int(time.time()),
                "model": agent.name,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": result["output"],
                                                     "refusal": None},
                             "finish_reason": turn.run.finish_reason or "stop", "logprobs": None}],
                "usage": result["usage"],
                "cost_usd": result["cost_usd"],
                "system_fingerprint": None,
            }), turn.response_headers)
        return await stream_response(turn, openai_stream, include_usage=data.include_usage)


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

"""Validation at the edge (and the OpenAPI schema): what each agent endpoint accepts and returns."""

from __future__ import annotations

from django.conf import settings
from rest_framework import serializers

from agentplatform.serializers import StrictSerializer

from .models import Message, Session


class InputMessageSerializer(serializers.Serializer):
    role = serializers.ChoiceField(choices=["system", "user", "assistant"])
    content = serializers.CharField(allow_blank=False, trim_whitespace=False)

    def validate_content(self, value: str) -> str:
        if len(value) > settings.MAX_MESSAGE_CHARS:
            raise serializers.ValidationError(f"Longer than {settings.MAX_MESSAGE_CHARS} characters.")
        return value


class ChatRequestSerializer(serializers.Serializer):
    message = serializers.CharField(required=False, allow_blank=False, trim_whitespace=False,
                                    help_text="The user's message. Give this or `messages`.")
    messages = InputMessageSerializer(many=True, required=False,
                                      help_text="New messages to append to the session (the last one from the user).")
    session_id = serializers.UUIDField(required=False, allow_null=True,
                                       help_text="Continue this session; an unknown id creates it with that id.")
    stream = serializers.BooleanField(required=False, default=False,
                                      help_text="Answer as text/event-stream, one event per runtime event.")
    metadata = serializers.DictField(required=False, default=dict)

    def validate_message(self, value: str) -> str:
        if len(value) > settings.MAX_MESSAGE_CHARS:
            raise serializers.ValidationError(f"Longer than {settings.MAX_MESSAGE_CHARS} characters.")
        return value

    def validate_messages(self, value: list) -> list:
        if not value:
            raise serializers.ValidationError("Give at least one message.")
        if len(value) > settings.MAX_MESSAGES_PER_REQUEST:
            raise serializers.ValidationError(f"At most {settings.MAX_MESSAGES_PER_REQUEST} messages.")
        if value[-1]["role"] != "user":
            raise serializers.ValidationError("The last message must be from the user.")
        return value

    def validate_metadata(self, value: dict) -> dict:
        import json

        if len(json.dumps(value)) > 16_384:
            raise serializers.ValidationError("At most 16 KiB of metadata.")
        return value

    def validate(self, attrs: dict) -> dict:
        unknown = set(self.initial_data) - set(self.fields)
        if unknown:
            raise serializers.ValidationError({sorted(unknown)[0]: "Unknown field."})
        if ("message" in attrs) == ("messages" in attrs):
            raise serializers.ValidationError({"message": "Give exactly one of `message` or `messages`."})
        if "message" in attrs:
            attrs["input_messages"] = [{"role": "user", "content": attrs.pop("message")}]
        else:
            attrs["input_messages"] = [dict(m) for m in attrs.pop("messages")]
        return attrs


class UsageSerializer(serializers.Serializer):
    prompt_tokens = serializers.IntegerField()
    completion_tokens = serializers.IntegerField()
    total_tokens = serializers.IntegerField()


class ToolCallResultSerializer(serializers.Serializer):
    id = serializers.CharField()
    name = serializers.CharField()
    arguments = serializers.CharField(help_text="JSON text, as the model wrote it.")
    result = serializers.CharField()
    is_error = serializers.BooleanField()


class ChatResponseSerializer(serializers.Serializer):
    id = serializers.UUIDField(help_text="The run's id.")
    session_id = serializers.UUIDField()
    agent = serializers.CharField()
    model = serializers.CharField(help_text="The model that answered (after any fallback).")
    output = serializers.CharField()
    tool_calls = ToolCallResultSerializer(many=True)
    usage = UsageSerializer()
    latency_ms = serializers.IntegerField()


class SkillSummarySerializer(serializers.Serializer):
    name = serializers.CharField()
    description = serializers.CharField()
    kind = serializers.CharField()
    parameters = serializers.JSONField()


class AgentSerializer(serializers.Serializer):
    name = serializers.CharField()
    description = serializers.CharField()
    model = serializers.CharField()
    fallback_models = serializers.ListField(child=serializers.CharField())
    temperature = serializers.FloatField()
    max_tokens = serializers.IntegerField()
    timeout_seconds = serializers.IntegerField()
    skills = SkillSummarySerializer(many=True)


class AgentDetailSerializer(AgentSerializer):
    system_prompt = serializers.CharField()
    metadata = serializers.JSONField()


class MessageSerializer(serializers.ModelSerializer):
    class Meta:
        model = Message
        fields = ["id", "role", "content", "tool_calls", "tool_call_id", "name", "prompt_tokens",
                  "completion_tokens", "run", "created_at"]


class SessionSerializer(serializers.ModelSerializer):
    agent = serializers.SlugRelatedField(slug_field="name", read_only=True)
    message_count = serializers.IntegerField(read_only=True)

    class Meta:
        model = Session
        fields = ["id", "agent", "title", "metadata", "created_at", "last_activity_at", "message_count"]


class SessionDetailSerializer(SessionSerializer):
    messages = MessageSerializer(many=True, read_only=True)

    class Meta(SessionSerializer.Meta):
        fields = SessionSerializer.Meta.fields + ["messages"]


class SessionCreateSerializer(StrictSerializer):
    agent = serializers.CharField(help_text="The agent's name.")
    id = serializers.UUIDField(required=False, help_text="Choose the session's id (default: a new UUID).")
    title = serializers.CharField(required=False, allow_blank=True, max_length=200, default="")
    metadata = serializers.DictField(required=False, default=dict)



"""Validation at the edge (and the OpenAPI schema): what each agent endpoint accepts and returns."""

from __future__ import annotations

from rest_framework import serializers

from agentplatform.serializers import MomentField, StrictSerializer

from .chat_input import REST_ROLES, metadata_of
from .models import Message, Run, Session


# The chat request's schema, for the OpenAPI document only: agents.chat_input validates
# (tests/test_chat_input.py keeps the two in step).


class InputMessageSerializer(serializers.Serializer):
    role = serializers.ChoiceField(choices=list(REST_ROLES))
    content = serializers.JSONField(help_text="A non-empty string, or a list of text parts `{type: text, text}`; "
                                              "at most MAX_MESSAGE_CHARS characters.")


class ChatRequestSerializer(serializers.Serializer):
    message = serializers.CharField(required=False, help_text="The user's message. Give this or `messages`.")
    messages = InputMessageSerializer(many=True, required=False,
                                      help_text="New messages to append to the session (the last one from the user).")
    session_id = serializers.UUIDField(required=False, allow_null=True,
                                       help_text="Continue this session; an unknown id creates it with that id.")
    stream = serializers.BooleanField(required=False, default=False,
                                      help_text="Answer as text/event-stream, one event per runtime event.")
    metadata = serializers.DictField(required=False, default=dict,
                                     help_text="Stored with the run: at most 16 KiB as compact UTF-8 JSON.")


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
    variant = serializers.CharField(allow_null=True, help_text="The experiment variant that served the turn "
                                                               "(also the X-Agent-Variant header); null: none.")


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
    max_retries = serializers.IntegerField(allow_null=True, help_text="null: the LLM_MAX_RETRIES setting.")
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

    def validate_metadata(self, value: dict) -> dict:
        return metadata_of(value)




# --- async runs ---------------------------------------------------------------------------


class RunCreateRequestSerializer(serializers.Serializer):
    """The schema of POST /api/v1/agents/{name}/runs (agents.chat_input.async_run_input validates)."""

    message = serializers.CharField(required=False, help_text="The user's message. Give this or `messages`.")
    messages = InputMessageSerializer(many=True, required=False,
                                      help_text="New messages to append to the session (the last one from the user).")
    session_id = serializers.UUIDField(required=False, allow_null=True,
                                       help_text="Continue this session; an unknown id creates it with that id.")
    metadata = serializers.DictField(required=False, default=dict,
                                     help_text="Stored with the run: at most 16 KiB as compact UTF-8 JSON.")
    callback_url = serializers.URLField(required=False, max_length=2000,
                                        help_text="POSTed the finished run (signed); a public http(s) address.")


class RunErrorSerializer(serializers.Serializer):
    code = serializers.CharField()
    message = serializers.CharField()


class RunCallbackSerializer(serializers.Serializer):
    status = serializers.ChoiceField(choices=["pending", "sent", "dead"])
    attempts = serializers.IntegerField()
    delivered_at = serializers.DateTimeField(allow_null=True)
    error = serializers.CharField(allow_null=True)


class RunSerializer(serializers.Serializer):
    """A run as GET /api/v1/runs/{id} answers (agents.runs.run_payload builds it)."""

    id = serializers.UUIDField()
    object = serializers.CharField(default="run")
    agent = serializers.CharField()
    session_id = serializers.UUIDField(allow_null=True)
    status = serializers.ChoiceField(choices=Run.Status.values)
    transport = serializers.ChoiceField(choices=Run.Transport.values)
    model = serializers.CharField()
    output = serializers.CharField(help_text="The answer, once the run ended (async runs; partial when cancelled).")
    usage = UsageSerializer()
    cost_usd = serializers.CharField(allow_null=True, help_text="USD as billed, a decimal string.")
    error = RunErrorSerializer(allow_null=True)
    metadata = serializers.DictField()
    attempts = serializers.IntegerField(help_text="Times a worker started it.")
    cancel_requested = serializers.BooleanField()
    queued_at = serializers.DateTimeField(allow_null=True)
    started_at = serializers.DateTimeField(allow_null=True)
    finished_at = serializers.DateTimeField(allow_null=True)
    latency_ms = serializers.IntegerField(allow_null=True)
    callback = RunCallbackSerializer(allow_null=True)
    variant = serializers.CharField(allow_null=True, help_text="The experiment variant that served the run.")
    feedback = serializers.IntegerField(allow_null=True, help_text="The rating given (1, -1) or null.")


class RunQuerySerializer(serializers.Serializer):
    """GET /api/v1/runs filters; `from`/`to` bound started_at (a queued run's: when it was queued)."""

    agent = serializers.CharField(required=False, max_length=64)
    status = serializers.ChoiceField(choices=Run.Status.values, required=False)
    transport = serializers.ChoiceField(choices=Run.Transport.values, required=False)
    session_id = serializers.UUIDField(required=False)
    # "from" is a Python keyword: declared under its query parameter name below.
    to = MomentField(required=False, end=True)

    def validate(self, attrs: dict) -> dict:
        if attrs.get("from") and attrs.get("to") and attrs["from"] >= attrs["to"]:
            raise serializers.ValidationError({"to": "Must be after `from`."})
        return attrs


RunQuerySerializer._declared_fields["from"] = MomentField(required=False)

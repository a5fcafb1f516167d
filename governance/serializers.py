"""Request validation and response shapes of the admin REST API for keys.

Requests are strict: a field the endpoint does not know is refused with 400 naming it (a typo
such as `rate_limt_rpm` must not silently create an unlimited key). Responses never carry a
secret's hash; the secret itself is added to the create and rotate responses only.
"""

from __future__ import annotations

from django.utils import timezone
from rest_framework import serializers

from agentplatform.serializers import StrictSerializer, model_integer

from .keys import STATUSES, api_key_status
from .models import ApiKey
from .services import MAX_GRACE_SECONDS


def _future(value):
    if value is not None and value <= timezone.now():
        raise serializers.ValidationError("Must be in the future.")
    return value


class _KeyFields(StrictSerializer):
    name = serializers.CharField(max_length=100, trim_whitespace=True)
    role = serializers.ChoiceField(choices=ApiKey.Role.choices)
    all_agents = serializers.BooleanField(required=False,
                                          help_text="true: the key may call every agent (then leave `agents` out). "
                                                    "Left out: true on create unless `agents` is given.")
    agents = serializers.ListField(child=serializers.CharField(max_length=100), required=False, allow_empty=True,
                                   max_length=1000,
                                   help_text="Agent names: the key may call only these ([]: none). Giving the list "
                                             "limits the key to it.")
    all_skills = serializers.BooleanField(required=False,
                                          help_text="true: every skill of an agent may be offered (then leave "
                                                    "`allowed_skills` out). Left out: true on create unless "
                                                    "`allowed_skills` is given.")
    allowed_skills = serializers.ListField(child=serializers.CharField(max_length=100), required=False,
                                           allow_empty=True, max_length=1000,
                                           help_text="Skill names: only these may be offered ([]: none). Giving "
                                                     "the list limits the key to it.")
    rate_limit_rpm = model_integer(ApiKey, "rate_limit_rpm", min_value=1, required=False, allow_null=True,
                                   help_text="Requests per minute; null = no limit.")
    rate_limit_tpm = model_integer(ApiKey, "rate_limit_tpm", min_value=1, required=False, allow_null=True,
                                   help_text="Tokens per minute; null = no limit.")


class ApiKeyCreateSerializer(_KeyFields):
    expires_at = serializers.DateTimeField(required=False, allow_null=True, validators=[_future])


class ApiKeyUpdateSerializer(_KeyFields):
    """PATCH: every field optional; an expiry in the past is allowed (it expires the key now)."""

    expires_at = serializers.DateTimeField(required=False, allow_null=True)
    enabled = serializers.BooleanField(required=False)


class ApiKeyRotateSerializer(StrictSerializer):
    grace_seconds = serializers.IntegerField(min_value=0, max_value=MAX_GRACE_SECONDS, required=False,
                                             help_text="How long the previous secret keeps working; "
                                                       "default API_KEY_ROTATION_GRACE_SECONDS (24 h).")


class ApiKeyRevokeSerializer(StrictSerializer):
    """No fields: the body is empty or {}."""


class ApiKeyListFilterSerializer(serializers.Serializer):
    role = serializers.ChoiceField(choices=ApiKey.Role.choices, required=False)
    enabled = serializers.BooleanField(required=False)
    status = serializers.ChoiceField(choices=STATUSES, required=False)


class ApiKeySerializer(serializers.ModelSerializer):
    """A key's state: never its secret, never a hash."""

    agents = serializers.SerializerMethodField(help_text="The agents a key with all_agents false may call; "
                                                         "[] with all_agents false: none.")
    status = serializers.SerializerMethodField()
    created_by = serializers.SerializerMethodField()

    class Meta:
        model = ApiKey
        fields = ["prefix", "name", "role", "status", "enabled", "all_agents", "agents", "all_skills",
                  "allowed_skills", "rate_limit_rpm", "rate_limit_tpm", "expires_at", "revoked_at", "last_used_at",
                  "created_at", "created_by", "rotated_at", "previous_secret_expires_at"]
        read_only_fields = fields

    def get_agents(self, key: ApiKey) -> list[str]:
        return sorted(a.name for a in key.agents.all())

    def get_status(self, key: ApiKey) -> str:
        return api_key_status(key)

    def get_created_by(self, key: ApiKey) -> str | None:
        return key.created_by.get_username() if key.created_by_id else None


class ApiKeyWithSecretSerializer(ApiKeySerializer):
    """The create and rotate responses: the state plus `key`, the full secret, shown this once."""

    key = serializers.CharField(read_only=True, help_text="The full key. Shown once; only its hash is stored.")

    class Meta(ApiKeySerializer.Meta):
        fields = ["key", *ApiKeySerializer.Meta.fields]
        read_only_fields = fields

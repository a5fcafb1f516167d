"""Edge validation of the prices admin API and the usage API. Money is Decimal, as strings."""

from __future__ import annotations

from decimal import Decimal

from rest_framework import serializers

from agentplatform.serializers import MomentField, StrictSerializer

from .models import ModelPrice

PRICE_FIELD = {"max_digits": 12, "decimal_places": 6, "min_value": Decimal("0")}


class ModelPriceSerializer(serializers.ModelSerializer):
    class Meta:
        model = ModelPrice
        fields = ["id", "model", "input_per_1m", "cached_input_per_1m", "output_per_1m", "effective_from", "source",
                  "created_at"]


class ModelPriceUpsertSerializer(StrictSerializer):
    model = serializers.CharField(max_length=200)
    input_per_1m = serializers.DecimalField(**PRICE_FIELD)
    output_per_1m = serializers.DecimalField(**PRICE_FIELD)
    cached_input_per_1m = serializers.DecimalField(**PRICE_FIELD, required=False, allow_null=True)
    effective_from = serializers.DateTimeField(required=False)

    def validate_model(self, value: str) -> str:
        value = value.strip()
        if not value or any(c.isspace() for c in value):
            raise serializers.ValidationError("A model name as agents use it, e.g. openai/gpt-4o-mini.")
        return value


class ModelPriceFilterSerializer(serializers.Serializer):
    model = serializers.CharField(required=False, max_length=200)


class UsageQuerySerializer(serializers.Serializer):
    # "from" is a Python keyword: the field is declared under its query parameter name below.
    to = MomentField(required=False, end=True)
    agent = serializers.CharField(required=False, max_length=100)
    model = serializers.CharField(required=False, max_length=200)
    key = serializers.CharField(required=False, max_length=64)
    group_by = serializers.ChoiceField(choices=["day", "agent", "model", "key"], required=False)

    def validate(self, attrs: dict) -> dict:
        if attrs.get("from") and attrs.get("to") and attrs["from"] >= attrs["to"]:
            raise serializers.ValidationError({"to": "Must be after `from`."})
        return attrs


UsageQuerySerializer._declared_fields["from"] = MomentField(required=False)

"""Edge validation of the prices admin API and the usage API. Money is Decimal, as strings."""

from __future__ import annotations

from datetime import datetime, time, timedelta
from datetime import timezone as dt_timezone
from decimal import Decimal

from django.utils.dateparse import parse_date, parse_datetime
from rest_framework import serializers

from agentplatform.serializers import StrictSerializer

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


# Usage can only exist in this range; outside it, day arithmetic (the next midnight, a day's
# rollup) would overflow Python's datetime at year 9999.
MOMENT_MIN = datetime(1970, 1, 1, tzinfo=dt_timezone.utc)
MOMENT_MAX = datetime(3000, 1, 1, tzinfo=dt_timezone.utc)
_OUT_OF_RANGE = "Out of range: dates from 1970-01-01 to 2999-12-31, datetimes up to 3000-01-01T00:00:00Z."


class _MomentField(serializers.Field):
    """An ISO date (its midnight UTC; for `to`, the next midnight: the day is included) or an
    ISO datetime (naive means UTC), from 1970-01-01 to 3000-01-01."""

    def __init__(self, *, end: bool = False, **kwargs) -> None:
        self.end = end
        super().__init__(**kwargs)

    def to_internal_value(self, data) -> datetime:
        text = str(data).strip()
        try:
            moment = parse_datetime(text) if "T" in text or " " in text else None
        except ValueError:  # well-formed but not a real moment (month 13, offset 99:00)
            moment = None
        if moment is None:
            try:
                day = parse_date(text)
            except ValueError:
                day = None
            if day is None:
                raise serializers.ValidationError("An ISO date (2025-01-31) or datetime (2025-01-31T12:00:00Z).")
            if not MOMENT_MIN.date() <= day < MOMENT_MAX.date():
                raise serializers.ValidationError(_OUT_OF_RANGE)
            moment = datetime.combine(day, time.min, tzinfo=dt_timezone.utc)
            if self.end:
                moment += timedelta(days=1)
        elif moment.tzinfo is None:
            moment = moment.replace(tzinfo=dt_timezone.utc)
        try:
            in_range = MOMENT_MIN <= moment.astimezone(dt_timezone.utc) <= MOMENT_MAX
        except OverflowError:  # 9999-12-31T23:00:00-05:00 is past year 9999 in UTC
            in_range = False
        if not in_range:
            raise serializers.ValidationError(_OUT_OF_RANGE)
        return moment


class UsageQuerySerializer(serializers.Serializer):
    # "from" is a Python keyword: the field is declared under its query parameter name below.
    to = _MomentField(required=False, end=True)
    agent = serializers.CharField(required=False, max_length=100)
    model = serializers.CharField(required=False, max_length=200)
    key = serializers.CharField(required=False, max_length=64)
    group_by = serializers.ChoiceField(choices=["day", "agent", "model", "key"], required=False)

    def validate(self, attrs: dict) -> dict:
        if attrs.get("from") and attrs.get("to") and attrs["from"] >= attrs["to"]:
            raise serializers.ValidationError({"to": "Must be after `from`."})
        return attrs


UsageQuerySerializer._declared_fields["from"] = _MomentField(required=False)

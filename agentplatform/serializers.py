"""Request-validation building blocks shared by every app's API.

* StrictSerializer: a field the endpoint does not know is refused with 400 naming it (a typo
  such as `hardd` or `rate_limt_rpm` must not silently fall back to a default).
* MomentField: a `from`/`to` query parameter: an ISO date or datetime (the usage API, run lists).
* model_integer: a serializer IntegerField bounded by what the model field's column holds, so
  2**63 is a 400 naming the field, not a database error after validation passed.
"""

from __future__ import annotations

from datetime import datetime, time, timedelta
from datetime import timezone as dt_timezone
from typing import Any

from django.db import models
from django.db.backends.base.operations import BaseDatabaseOperations
from django.utils.dateparse import parse_date, parse_datetime
from rest_framework import serializers


class StrictSerializer(serializers.Serializer):
    """Refuses unknown fields (and read-only ones sent in a request)."""

    def to_internal_value(self, data: Any) -> Any:
        if isinstance(data, dict):
            writable = {name for name, field in self.fields.items() if not field.read_only}
            unknown = [name for name in data if name not in writable]
            if unknown:
                raise serializers.ValidationError({unknown[0]: ["Unknown field."]})
        return super().to_internal_value(data)


def column_range(model: type[models.Model], field_name: str) -> tuple[int | None, int | None]:
    """The values an integer model field's column holds on every supported database (Django's
    portable ranges: SQLite would store more, PostgreSQL would refuse it)."""
    field = model._meta.get_field(field_name)
    return BaseDatabaseOperations.integer_field_ranges.get(field.get_internal_type(), (None, None))


def model_integer(model: type[models.Model], field_name: str, *, min_value: int | None = None,
                  max_value: int | None = None, **kwargs: Any) -> serializers.IntegerField:
    """An IntegerField for `model.field_name`: within the column's range, narrowed by min/max."""
    low, high = column_range(model, field_name)
    if min_value is not None:
        low = min_value if low is None else max(low, min_value)
    if max_value is not None:
        high = max_value if high is None else min(high, max_value)
    return serializers.IntegerField(min_value=low, max_value=high, **kwargs)


# What lists and reports are filtered by can only exist in this range; outside it, day
# arithmetic (the next midnight, a day's rollup) would overflow Python's datetime at year 9999.
MOMENT_MIN = datetime(1970, 1, 1, tzinfo=dt_timezone.utc)
MOMENT_MAX = datetime(3000, 1, 1, tzinfo=dt_timezone.utc)
_OUT_OF_RANGE = "Out of range: dates from 1970-01-01 to 2999-12-31, datetimes up to 3000-01-01T00:00:00Z."


class MomentField(serializers.Field):
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

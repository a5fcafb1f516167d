"""Request-validation building blocks shared by every app's API.

* StrictSerializer: a field the endpoint does not know is refused with 400 naming it (a typo
  such as `hardd` or `rate_limt_rpm` must not silently fall back to a default).
* model_integer: a serializer IntegerField bounded by what the model field's column holds, so
  2**63 is a 400 naming the field, not a database error after validation passed.
"""

from __future__ import annotations

from typing import Any

from django.db import models
from django.db.backends.base.operations import BaseDatabaseOperations
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

"""GET /api/v1/usage: tokens and USD over a period, in total and grouped.

    ?from=&to=          ISO dates (a `to` date is included) or datetimes; default: this month (UTC)
    ?agent=&model=      only this agent (name) / model
    ?key=               only this API key (prefix); an admin key may name any key
    ?group_by=          day | agent | model | key

→ {from, to, total: {requests, prompt_tokens, completion_tokens, cost_usd}, groups: [{<group_by>: ..., same}]}
Answered by billing.rollups (daily rollups for whole rolled-up days, usage records for the rest,
exact either way), so it costs about the same at a million records as at a thousand.
`requests` counts runs: each run once, in the day, agent, key and model of its first usage record
(a run that fell back to a second model counts under the model it started on; a run across
midnight on the day it started; records without a run are not requests). Totals and per-day,
per-agent and per-key groups are therefore distinct runs. A non-admin key sees its own key's
usage only (a `key` filter naming another key finds nothing); admin keys see all. cost_usd is a
decimal string.
"""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal

from django.utils import timezone
from drf_spectacular.utils import OpenApiParameter, extend_schema
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from governance.permissions import HasApiKey
from governance.principal import Principal

from . import rollups
from .budgets import period_end, period_start
from .serializers import UsageQuerySerializer


def _money(value) -> str:
    return format(Decimal(value or 0).quantize(Decimal("0.00000001")), "f")


def _shape(row: dict) -> dict:
    return {"requests": row["requests"], "prompt_tokens": row["prompt_tokens"],
            "completion_tokens": row["completion_tokens"], "cost_usd": _money(row["cost_usd"])}


def usage_summary(*, principal: Principal, start: datetime, end: datetime, agent: str | None = None,
                  model: str | None = None, key: str | None = None, group_by: str | None = None) -> dict:
    """Totals (and groups) of the usage the principal may see in [start, end)."""
    filters = {"agent": agent, "model": model, "key": key}
    if not principal.is_admin:
        filters["key_id"] = principal.key_id  # with a `key` naming another key: nothing
    summary = rollups.usage_summary(start=start, end=end, group_by=group_by, filters=filters)
    return {"total": _shape(summary["total"]),
            "groups": [{group_by: group[group_by], **_shape(group)} for group in summary["groups"]]}


class UsageView(APIView):
    permission_classes = [HasApiKey]

    @extend_schema(parameters=[
        OpenApiParameter("from", str, description="ISO date or datetime; default: the 1st of this month (UTC)."),
        OpenApiParameter("to", str, description="ISO date (included) or datetime (excluded); default: next month."),
        OpenApiParameter("agent", str), OpenApiParameter("model", str),
        OpenApiParameter("key", str, description="An API key prefix (admin keys: any key)."),
        OpenApiParameter("group_by", str, enum=["day", "agent", "model", "key"]),
    ], responses={200: dict})
    def get(self, request: Request) -> Response:
        query = UsageQuerySerializer(data=request.query_params)
        query.is_valid(raise_exception=True)
        q = query.validated_data
        # The budgets' month (billing.budgets computes every period, UTC).
        now = timezone.now()
        start, end = q.get("from") or period_start("month", now), q.get("to") or period_end("month", now)
        summary = usage_summary(principal=request.user, start=start, end=end, agent=q.get("agent"),
                                model=q.get("model"), key=q.get("key"), group_by=q.get("group_by"))
        return Response({"from": start.isoformat(), "to": end.isoformat(), **summary})

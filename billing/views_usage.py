"""GET /api/v1/usage: tokens and USD over a period, in total and grouped.

    ?from=&to=          ISO dates (a `to` date is included) or datetimes; default: this month (UTC)
    ?agent=&model=      only this agent (name) / model
    ?key=               only this API key (prefix); an admin key may name any key
    ?group_by=          day | agent | model | key

→ {from, to, total: {requests, prompt_tokens, completion_tokens, cost_usd}, groups: [{<group_by>: ..., same}]}
`requests` counts distinct runs. A non-admin key sees its own key's usage only (a `key` filter
naming another key finds nothing); admin keys see all. Aggregates run on the
(api_key|agent|model, created_at) indexes; cost_usd is a decimal string.
"""

from __future__ import annotations

from datetime import datetime
from datetime import timezone as dt_timezone
from decimal import Decimal

from django.db.models import Count, F, Sum
from django.db.models.functions import Coalesce, TruncDay
from django.utils import timezone
from drf_spectacular.utils import OpenApiParameter, extend_schema
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from governance.permissions import HasApiKey, owned_by_key
from governance.principal import Principal

from .models import UsageRecord
from .serializers import UsageQuerySerializer

GROUP_FIELDS = {"agent": "agent__name", "model": "model", "key": "api_key__prefix"}


def _month_bounds(now: datetime) -> tuple[datetime, datetime]:
    start = now.astimezone(dt_timezone.utc).replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    end = start.replace(year=start.year + 1, month=1) if start.month == 12 else start.replace(month=start.month + 1)
    return start, end


_AGGREGATES = {
    "requests": Count("run_id", distinct=True),
    "prompt_tokens": Coalesce(Sum("prompt_tokens"), 0),
    "completion_tokens": Coalesce(Sum("completion_tokens"), 0),
    "cost_usd": Coalesce(Sum("cost_usd"), Decimal("0")),
}


def _money(value) -> str:
    return format(Decimal(value or 0).quantize(Decimal("0.00000001")), "f")


def _shape(row: dict) -> dict:
    return {"requests": row["requests"], "prompt_tokens": row["prompt_tokens"],
            "completion_tokens": row["completion_tokens"], "cost_usd": _money(row["cost_usd"])}


def usage_summary(*, principal: Principal, start: datetime, end: datetime, agent: str | None = None,
                  model: str | None = None, key: str | None = None, group_by: str | None = None) -> dict:
    """Totals (and groups) of the usage the principal may see in [start, end)."""
    rows = owned_by_key(UsageRecord.objects.all(), principal).filter(created_at__gte=start, created_at__lt=end)
    if agent:
        rows = rows.filter(agent__name=agent)
    if model:
        rows = rows.filter(model=model)
    if key:
        rows = rows.filter(api_key__prefix=key)
    rows = rows.order_by()
    result = {"total": _shape(rows.aggregate(**_AGGREGATES)), "groups": []}
    if group_by == "day":
        grouped = rows.annotate(group=TruncDay("created_at", tzinfo=dt_timezone.utc)).values("group")
    elif group_by:
        grouped = rows.annotate(group=F(GROUP_FIELDS[group_by])).values("group")
    else:
        return result
    for row in grouped.annotate(**_AGGREGATES).order_by("group"):
        value = row["group"]
        if group_by == "day" and value is not None:
            value = value.date().isoformat() if isinstance(value, datetime) else str(value)
        result["groups"].append({group_by: value, **_shape(row)})
    return result


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
        month_start, month_end = _month_bounds(timezone.now())
        start, end = q.get("from") or month_start, q.get("to") or month_end
        summary = usage_summary(principal=request.user, start=start, end=end, agent=q.get("agent"),
                                model=q.get("model"), key=q.get("key"), group_by=q.get("group_by"))
        return Response({"from": start.isoformat(), "to": end.isoformat(), **summary})

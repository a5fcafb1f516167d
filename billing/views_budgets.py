"""Budgets over REST.

    POST /api/v1/admin/budgets   (admin role) {scope, key?: prefix, agent?: name, period, limit_usd,
                                 hard?, alert_thresholds?, alert_emails?, alert_webhook_url?, name?}
                                 → 201 with the budget
    GET  /api/v1/admin/budgets   (admin role) every budget with its current period's money
    GET  /api/v1/budgets         the budgets that apply to the calling key, with limit, spent,
                                 reserved and remaining in the current period (never their alert
                                 recipients or webhook: those are for admin keys only)

Plain sync DRF views (not the chat path): validate at the edge, call one service. Money is a
decimal string.
"""

from __future__ import annotations

from decimal import Decimal

from django.db.models import Q
from django.utils import timezone
from drf_spectacular.utils import OpenApiResponse, extend_schema
from rest_framework import generics, serializers, status
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from agentplatform.asyncviews import client_ip
from agentplatform.errors import request_id_of
from governance.permissions import IsAdminKey

from .budgets import alert_thresholds_of, budget_create, budget_status, budgets_for_key, period_end, period_start
from .models import Budget, BudgetSpend

ERRORS = {
    400: OpenApiResponse(description="Invalid body: `error.param` names the field."),
    401: OpenApiResponse(description="Missing or invalid API key."),
    403: OpenApiResponse(description="The key is not an admin key."),
    404: OpenApiResponse(description="No key with this prefix, or no agent with this name."),
}


class BudgetCreateSerializer(serializers.Serializer):
    scope = serializers.ChoiceField(choices=Budget.Scope.values)
    key = serializers.CharField(required=False, allow_blank=False, max_length=64)
    agent = serializers.CharField(required=False, allow_blank=False, max_length=100)
    period = serializers.ChoiceField(choices=Budget.Period.values)
    limit_usd = serializers.DecimalField(max_digits=18, decimal_places=8, min_value=Decimal("0"))
    hard = serializers.BooleanField(default=True)
    alert_thresholds = serializers.ListField(child=serializers.IntegerField(min_value=1, max_value=1000),
                                             required=False, max_length=20,
                                             help_text="Percent of the limit, each fired once per period; "
                                                       "stored sorted without duplicates. Empty or absent: "
                                                       "50, 75, 90, 100.")
    alert_emails = serializers.ListField(child=serializers.EmailField(max_length=254), required=False, max_length=20,
                                         help_text="Alert recipients (default: BUDGET_ALERT_EMAILS).")
    alert_webhook_url = serializers.URLField(required=False, allow_blank=True, max_length=1000, default="",
                                             help_text="POSTed each alert as JSON (default: BUDGET_ALERT_WEBHOOK_URL).")
    name = serializers.CharField(required=False, allow_blank=True, max_length=100, default="")

    def validate_alert_thresholds(self, value: list[int]) -> list[int]:
        return sorted(set(value))

    def validate_alert_emails(self, value: list[str]) -> list[str]:
        value = list(dict.fromkeys(value))
        if len(", ".join(value)) > Budget._meta.get_field("alert_emails").max_length:
            raise serializers.ValidationError("Too many addresses (1000 characters at most).")
        return value

    def validate_alert_webhook_url(self, value: str) -> str:
        if value and not value.lower().startswith(("http://", "https://")):
            raise serializers.ValidationError("An http(s) URL.")
        return value


def _money(value: Decimal) -> str:
    return f"{value:.8f}"


def _budget_data(budget: Budget, money: dict, start, now, *, admin: bool = False) -> dict:
    end = period_end(budget.period, now)
    data = {"id": budget.id, "name": budget.name, "scope": budget.scope,
            "key": budget.api_key.prefix if budget.api_key_id else None,
            "agent": budget.agent.name if budget.agent_id else None,
            "period": budget.period, "hard": budget.hard, "enabled": budget.enabled,
            "alert_thresholds": alert_thresholds_of(budget), "limit_usd": _money(budget.limit_usd),
            "spent_usd": _money(money["spent_usd"]), "reserved_usd": _money(money["reserved_usd"]),
            "remaining_usd": _money(money["remaining_usd"]), "period_start": start.isoformat(),
            "period_end": end.isoformat() if end else None}
    if admin:
        data["alert_emails"] = [a.strip() for a in budget.alert_emails.split(",") if a.strip()]
        data["alert_webhook_url"] = budget.alert_webhook_url
    return data


def _with_money(budgets: list[Budget], *, admin: bool = False) -> list[dict]:
    now = timezone.now()
    spends = {}
    if budgets:
        q = Q()
        for b in budgets:
            q |= Q(budget_id=b.id, period_start=period_start(b.period, now))
        spends = {s.budget_id: s for s in BudgetSpend.objects.filter(q)}
    return [_budget_data(b, budget_status(b, spends.get(b.id)), period_start(b.period, now), now, admin=admin)
            for b in budgets]


class AdminBudgetListView(generics.GenericAPIView):
    permission_classes = [IsAdminKey]
    serializer_class = BudgetCreateSerializer
    queryset = Budget.objects.none()

    @extend_schema(responses={200: OpenApiResponse(description="Budgets with their current period."), **ERRORS})
    def get(self, request: Request) -> Response:
        queryset = Budget.objects.select_related("api_key", "agent").order_by("scope", "id")
        page = self.paginate_queryset(queryset)
        return self.get_paginated_response(_with_money(list(page), admin=True))

    @extend_schema(request=BudgetCreateSerializer, responses={201: OpenApiResponse(description="The budget."),
                                                             **ERRORS})
    def post(self, request: Request) -> Response:
        serializer = BudgetCreateSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        data = serializer.validated_data
        budget = budget_create(
            scope=data["scope"], period=data["period"], limit_usd=data["limit_usd"], hard=data["hard"],
            key_prefix=data.get("key"), agent_name=data.get("agent"), alert_thresholds=data.get("alert_thresholds"),
            alert_emails=data.get("alert_emails"), alert_webhook_url=data["alert_webhook_url"],
            name=data["name"], actor=request.user.actor, request_id=request_id_of(request) or "",
            client_ip=client_ip(request._request))
        budget = Budget.objects.select_related("api_key", "agent").get(pk=budget.pk)
        return Response(_with_money([budget], admin=True)[0], status=status.HTTP_201_CREATED)


class BudgetListView(APIView):
    """The budgets that apply to the calling key, current period."""

    @extend_schema(responses={200: OpenApiResponse(description='{"budgets": [...]}'),
                              401: OpenApiResponse(description="Missing or invalid API key.")})
    def get(self, request: Request) -> Response:
        now = timezone.now()
        rows = budgets_for_key(key_id=request.user.key_id, now=now)
        return Response({"budgets": [_budget_data(b, money, start, now) for b, money, start in rows]})

"""Budgets over REST.

    POST   /api/v1/admin/budgets       (admin role) {scope, key?: prefix, agent?: name, period, limit_usd,
                                       hard?, alert_thresholds?, alert_emails?, alert_webhook_url?, name?}
                                       → 201 with the budget
    GET    /api/v1/admin/budgets       (admin role) budgets with their current period's money
                                       (?scope=&period=&enabled=&agent=&key=&limit=&offset=)
    GET    /api/v1/admin/budgets/{id}  (admin role) one budget with its current period's money
    PATCH  /api/v1/admin/budgets/{id}  (admin role) {name?, limit_usd?, hard?, enabled?, alert_thresholds?,
                                       alert_emails?, alert_webhook_url?}; scope, key, agent and period
                                       are fixed (400 naming the field) → 200 with the budget
    DELETE /api/v1/admin/budgets/{id}  (admin role) disables the budget (its spend history stays) → 204
    GET  /api/v1/budgets         the budgets that apply to the calling key, with limit, spent,
                                 reserved and remaining in the current period (never their alert
                                 recipients or webhook: those are for admin keys only)

Plain sync DRF views (not the chat path): validate at the edge, call one service. Money is a
decimal string.
"""

from __future__ import annotations

from decimal import Decimal

from django.utils import timezone
from drf_spectacular.utils import OpenApiParameter, OpenApiResponse, extend_schema
from rest_framework import generics, serializers, status
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from agentplatform.asyncviews import client_ip
from agentplatform.errors import NotFound, request_id_of
from agentplatform.serializers import StrictSerializer
from governance.permissions import IsAdminKey

from .budgets import (
    BUDGET_IMMUTABLE_FIELDS,
    alert_thresholds_of,
    budget_create,
    budget_disable,
    budget_status,
    budget_update,
    budgets_for_key,
    current_spends,
    period_end,
    period_start,
)
from .models import Budget

ERRORS = {
    400: OpenApiResponse(description="Invalid body: `error.param` names the field."),
    401: OpenApiResponse(description="Missing or invalid API key."),
    403: OpenApiResponse(description="The key is not an admin key."),
    404: OpenApiResponse(description="No budget with this id, no key with this prefix, or no agent with this name."),
}


class BudgetCreateSerializer(StrictSerializer):
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


class BudgetUpdateSerializer(BudgetCreateSerializer):
    """The changeable fields, each optional (validated as on create); scope, key, agent and
    period are refused by name, any other unknown field too."""

    scope = None
    key = None
    agent = None
    period = None
    enabled = serializers.BooleanField(required=False)

    def to_internal_value(self, data):
        if isinstance(data, dict):
            for field in BUDGET_IMMUTABLE_FIELDS:
                if field in data:
                    raise serializers.ValidationError(
                        {field: [f"A budget's {field} cannot be changed; create another budget instead."]})
        return super().to_internal_value(data)  # StrictSerializer: any other unknown field is refused


class BudgetListFilterSerializer(serializers.Serializer):
    scope = serializers.ChoiceField(choices=Budget.Scope.values, required=False)
    period = serializers.ChoiceField(choices=Budget.Period.values, required=False)
    enabled = serializers.BooleanField(required=False)
    agent = serializers.CharField(required=False, max_length=100, help_text="Agent name.")
    key = serializers.CharField(required=False, max_length=64, help_text="API key prefix.")


def _money(value: Decimal) -> str:
    return f"{value:.8f}"


def _percent(spent: Decimal, budget: Budget) -> float | None:
    """Spent as a percentage of the limit (2 decimals); None for a zero limit."""
    if budget.limit_usd <= 0:
        return None
    return float((spent * 100 / budget.limit_usd).quantize(Decimal("0.01")))


def _budget_data(budget: Budget, money: dict, start, now, *, admin: bool = False) -> dict:
    end = period_end(budget.period, now)
    data = {"id": budget.id, "name": budget.name, "scope": budget.scope,
            "key": budget.api_key.prefix if budget.api_key_id else None,
            "agent": budget.agent.name if budget.agent_id else None,
            "period": budget.period, "hard": budget.hard, "enabled": budget.enabled,
            "alert_thresholds": alert_thresholds_of(budget), "limit_usd": _money(budget.limit_usd),
            "spent_usd": _money(money["spent_usd"]), "reserved_usd": _money(money["reserved_usd"]),
            "remaining_usd": _money(money["remaining_usd"]), "percent_used": _percent(money["spent_usd"], budget),
            "period_start": start.isoformat(),
            "period_end": end.isoformat() if end else None}
    if admin:
        data["alert_emails"] = [a.strip() for a in budget.alert_emails.split(",") if a.strip()]
        data["alert_webhook_url"] = budget.alert_webhook_url
    return data


def _with_money(budgets: list[Budget], *, admin: bool = False) -> list[dict]:
    now = timezone.now()
    spends = current_spends(budgets, now)
    return [_budget_data(b, budget_status(b, spends.get(b.id)), period_start(b.period, now), now, admin=admin)
            for b in budgets]


def _budgets():
    return Budget.objects.select_related("api_key", "agent")


def _audit_context(request: Request) -> dict:
    return {"actor": request.user.actor, "request_id": request_id_of(request) or "",
            "client_ip": client_ip(request._request)}


class AdminBudgetListView(generics.GenericAPIView):
    permission_classes = [IsAdminKey]
    serializer_class = BudgetCreateSerializer
    queryset = Budget.objects.none()

    @extend_schema(operation_id="api_v1_admin_budgets_list",
                   parameters=[OpenApiParameter("scope", str, enum=Budget.Scope.values),
                               OpenApiParameter("period", str, enum=Budget.Period.values),
                               OpenApiParameter("enabled", bool),
                               OpenApiParameter("agent", str, description="Agent name."),
                               OpenApiParameter("key", str, description="API key prefix.")],
                   responses={200: OpenApiResponse(description="Budgets with their current period."), **ERRORS})
    def get(self, request: Request) -> Response:
        # A plain dict: DRF reads a missing boolean in a QueryDict as an unticked checkbox (False).
        filters = BudgetListFilterSerializer(data=request.query_params.dict())
        filters.is_valid(raise_exception=True)
        data = filters.validated_data
        queryset = _budgets().order_by("scope", "id")
        for field, lookup in (("scope", "scope"), ("period", "period"), ("enabled", "enabled"),
                              ("agent", "agent__name"), ("key", "api_key__prefix")):
            if field in data:
                queryset = queryset.filter(**{lookup: data[field]})
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
            name=data["name"], **_audit_context(request))
        budget = _budgets().get(pk=budget.pk)
        return Response(_with_money([budget], admin=True)[0], status=status.HTTP_201_CREATED)


class AdminBudgetDetailView(generics.GenericAPIView):
    permission_classes = [IsAdminKey]
    serializer_class = BudgetUpdateSerializer
    queryset = Budget.objects.none()

    @staticmethod
    def get_budget(budget_id: int) -> Budget:
        budget = _budgets().filter(pk=budget_id).first()
        if budget is None:
            raise NotFound(f"No budget with id {budget_id}.", code="budget_not_found", param="id")
        return budget

    @extend_schema(responses={200: OpenApiResponse(description="The budget with its current period."), **ERRORS})
    def get(self, request: Request, budget_id: int) -> Response:
        return Response(_with_money([self.get_budget(budget_id)], admin=True)[0])

    @extend_schema(request=BudgetUpdateSerializer,
                   responses={200: OpenApiResponse(description="The budget."), **ERRORS},
                   description="Takes effect on the next request on every worker. scope, key, agent and period "
                               "cannot be changed (400 naming the field): create another budget.")
    def patch(self, request: Request, budget_id: int) -> Response:
        self.get_budget(budget_id)
        serializer = BudgetUpdateSerializer(data=request.data, partial=True)
        serializer.is_valid(raise_exception=True)
        budget_update(budget_id=budget_id, fields=dict(serializer.validated_data), **_audit_context(request))
        return Response(_with_money([self.get_budget(budget_id)], admin=True)[0])

    @extend_schema(request=None, responses={204: OpenApiResponse(description="Disabled."), **ERRORS},
                   description="Disables the budget (PATCH enabled=true enables it again); its spend history "
                               "stays. Disabling a disabled budget answers the same.")
    def delete(self, request: Request, budget_id: int) -> Response:
        self.get_budget(budget_id)
        budget_disable(budget_id=budget_id, **_audit_context(request))
        return Response(status=status.HTTP_204_NO_CONTENT)


class BudgetListView(APIView):
    """The budgets that apply to the calling key, current period."""

    @extend_schema(responses={200: OpenApiResponse(description='{"budgets": [...]}'),
                              401: OpenApiResponse(description="Missing or invalid API key.")})
    def get(self, request: Request) -> Response:
        now = timezone.now()
        rows = budgets_for_key(key_id=request.user.key_id, now=now)
        return Response({"budgets": [_budget_data(b, money, start, now) for b, money, start in rows]})

"""Billing in the admin: prices (editable), usage and alerts (read-only history), budgets with
their alert settings, alert deliveries with a retry action for dead letters."""

from __future__ import annotations

from typing import Any

from django import forms
from django.contrib import admin, messages
from django.core.cache import cache
from django.core.exceptions import ValidationError
from django.core.validators import URLValidator, validate_email
from django.db import transaction
from django.db.models import QuerySet
from django.http import HttpRequest
from django.utils.html import format_html_join

from agentplatform.admin_mixins import ReadOnlyAdminMixin
from governance.audit import audit_record, user_actor

from .alerts import alert_deliveries_retry
from .budgets import BUDGETS_CACHE_KEY, DEFAULT_ALERT_THRESHOLDS
from .models import AlertDelivery, Budget, BudgetAlert, BudgetSpend, ModelPrice, UsageRecord, UsageRollup


@admin.register(ModelPrice)
class ModelPriceAdmin(admin.ModelAdmin):
    """Editable: a save drops the cached prices (billing.pricing signals), the next turn sees it."""

    list_display = ["model", "input_per_1m", "cached_input_per_1m", "output_per_1m", "effective_from", "source"]
    list_filter = ["source"]
    search_fields = ["model"]
    date_hierarchy = "effective_from"
    ordering = ["model", "-effective_from"]


@admin.register(UsageRecord)
class UsageRecordAdmin(admin.ModelAdmin):
    """Read-only: records are written by the metering stage with the run they belong to."""

    list_display = ["created_at", "model", "agent", "api_key", "prompt_tokens", "completion_tokens", "cost_usd",
                    "estimated", "priced"]
    list_filter = ["estimated", "priced"]
    search_fields = ["model", "request_id", "api_key__prefix", "agent__name"]
    list_select_related = ["agent", "api_key"]
    raw_id_fields = ["run", "api_key", "agent"]
    show_full_result_count = False

    def has_add_permission(self, request) -> bool:
        return False

    def has_change_permission(self, request, obj=None) -> bool:
        return False

    def has_delete_permission(self, request, obj=None) -> bool:
        return False


# --- budgets ------------------------------------------------------------------------------


class BudgetForm(forms.ModelForm):
    alert_thresholds = forms.CharField(
        required=False, help_text=f"Percent of the limit, comma-separated (1–1000). Empty: "
                                  f"{', '.join(map(str, DEFAULT_ALERT_THRESHOLDS))}. Each fires once per period.")
    alert_webhook_url = forms.URLField(required=False, max_length=1000, assume_scheme="https",
                                       help_text=Budget._meta.get_field("alert_webhook_url").help_text)

    class Meta:
        model = Budget
        fields = ["name", "scope", "api_key", "agent", "period", "limit_usd", "hard", "enabled", "alert_thresholds",
                  "alert_emails", "alert_webhook_url"]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if self.instance.pk and isinstance(self.instance.alert_thresholds, list):
            self.initial["alert_thresholds"] = ", ".join(str(t) for t in self.instance.alert_thresholds)

    def clean_alert_thresholds(self) -> list[int]:
        raw = self.cleaned_data.get("alert_thresholds") or ""
        try:
            values = [int(part) for part in raw.replace(";", ",").split(",") if part.strip()]
        except ValueError:
            raise ValidationError("Whole percentages separated by commas, e.g. 50, 75, 90, 100.") from None
        if any(v < 1 or v > 1000 for v in values):
            raise ValidationError("Each threshold is between 1 and 1000 (percent of the limit).")
        return sorted(set(values))

    def clean_alert_emails(self) -> str:
        addresses = [a.strip() for a in (self.cleaned_data.get("alert_emails") or "").split(",") if a.strip()]
        for address in addresses:
            try:
                validate_email(address)
            except ValidationError:
                raise ValidationError(f"{address!r} is not an e-mail address.") from None
        return ", ".join(dict.fromkeys(addresses))

    def clean_alert_webhook_url(self) -> str:
        url = (self.cleaned_data.get("alert_webhook_url") or "").strip()
        if url:
            URLValidator(schemes=["http", "https"], message="An http(s) URL.")(url)
        return url

    def clean(self) -> dict:
        data = super().clean()
        scope = data.get("scope")
        needs_key = scope in (Budget.Scope.KEY, Budget.Scope.KEY_AGENT)
        needs_agent = scope in (Budget.Scope.AGENT, Budget.Scope.KEY_AGENT)
        for field, needed in (("api_key", needs_key), ("agent", needs_agent)):
            if scope and needed and not data.get(field):
                self.add_error(field, f"A {scope} budget needs one.")
            if scope and not needed and data.get(field):
                self.add_error(field, f"A {scope} budget takes none.")
        return data


class BudgetSpendInline(admin.TabularInline):
    model = BudgetSpend
    fields = ["period_start", "spent_usd", "reserved_usd", "updated_at"]
    readonly_fields = fields
    ordering = ["-period_start"]
    extra = 0
    max_num = 0
    can_delete = False
    verbose_name_plural = "spend per period"

    def has_add_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False


@admin.register(Budget)
class BudgetAdmin(admin.ModelAdmin):
    """Changes are audited ("budget.created|updated|deleted") and reach the chat path at once
    (the cached list of enabled budgets is dropped on commit)."""

    form = BudgetForm
    list_display = ["__str__", "scope", "api_key", "agent", "period", "limit_usd", "hard", "enabled", "thresholds",
                    "alert_channels"]
    list_filter = ["scope", "period", "hard", "enabled"]
    search_fields = ["name", "api_key__prefix", "agent__name"]
    list_select_related = ["api_key", "agent"]
    raw_id_fields = ["api_key", "agent"]
    inlines = [BudgetSpendInline]
    fieldsets = [
        (None, {"fields": ["name", "scope", "api_key", "agent", "period", "limit_usd", "hard", "enabled"]}),
        ("Alerts", {"fields": ["alert_thresholds", "alert_emails", "alert_webhook_url"],
                    "description": "Empty recipients / webhook: BUDGET_ALERT_EMAILS / BUDGET_ALERT_WEBHOOK_URL."}),
    ]

    @admin.display(description="Alert thresholds (%)")
    def thresholds(self, obj: Budget) -> str:
        return ", ".join(map(str, obj.alert_thresholds or DEFAULT_ALERT_THRESHOLDS))

    @admin.display(description="Alerts to")
    def alert_channels(self, obj: Budget) -> str:
        channels = [name for name, on in (("e-mail", obj.alert_emails), ("webhook", obj.alert_webhook_url)) if on]
        return ", ".join(channels) or "defaults"

    def save_model(self, request: HttpRequest, obj: Budget, form: forms.ModelForm, change: bool) -> None:
        with transaction.atomic():
            super().save_model(request, obj, form, change)
            # The addresses and the URL (it may carry a token) are not logged: only that they changed.
            audit_record(actor=user_actor(request.user), action=f"budget.{'updated' if change else 'created'}",
                         target=f"budget:{obj.id}",
                         details={"changed": form.changed_data, "scope": obj.scope, "period": obj.period,
                                  "limit_usd": str(obj.limit_usd), "hard": obj.hard, "enabled": obj.enabled,
                                  "alert_thresholds": obj.alert_thresholds})
            transaction.on_commit(lambda: cache.delete(BUDGETS_CACHE_KEY))

    def delete_model(self, request: HttpRequest, obj: Budget) -> None:
        self.delete_queryset(request, Budget.objects.filter(pk=obj.pk))

    def delete_queryset(self, request: HttpRequest, queryset: QuerySet) -> None:
        with transaction.atomic():
            for budget in queryset:
                audit_record(actor=user_actor(request.user), action="budget.deleted", target=f"budget:{budget.id}",
                             details={"scope": budget.scope, "period": budget.period,
                                      "limit_usd": str(budget.limit_usd)})
            queryset.delete()
            transaction.on_commit(lambda: cache.delete(BUDGETS_CACHE_KEY))


# --- alerts -------------------------------------------------------------------------------


class AlertDeliveryInline(ReadOnlyAdminMixin, admin.TabularInline):
    model = AlertDelivery
    fields = ["channel", "target", "status", "attempts", "last_error", "delivered_at", "updated_at"]
    readonly_fields = fields
    extra = 0


@admin.register(BudgetAlert)
class BudgetAlertAdmin(ReadOnlyAdminMixin, admin.ModelAdmin):
    """Read-only: an alert is fired once per threshold and period by billing.alerts."""

    list_display = ["created_at", "budget", "threshold_percent", "period_start", "spent_usd", "limit_usd",
                    "delivery_status"]
    list_filter = ["threshold", "budget", "created_at", "period_start"]
    search_fields = ["budget__name", "budget__api_key__prefix", "budget__agent__name"]
    list_select_related = ["budget"]
    date_hierarchy = "created_at"
    inlines = [AlertDeliveryInline]
    show_full_result_count = False

    def get_queryset(self, request: HttpRequest) -> QuerySet:
        return super().get_queryset(request).prefetch_related("deliveries")

    @admin.display(description="Threshold", ordering="threshold")
    def threshold_percent(self, obj: BudgetAlert) -> str:
        return f"{obj.threshold} %"

    @admin.display(description="Deliveries")
    def delivery_status(self, obj: BudgetAlert) -> str:
        deliveries = list(obj.deliveries.all())
        if not deliveries:
            return "none configured"
        return format_html_join(", ", "{}: {}", ((d.channel, d.status) for d in deliveries))


@admin.register(AlertDelivery)
class AlertDeliveryAdmin(ReadOnlyAdminMixin, admin.ModelAdmin):
    """Deliveries and dead letters (status "dead": out of retries). "Retry" sends dead ones again."""

    list_display = ["id", "event", "alert", "channel", "status", "attempts", "short_error", "delivered_at",
                    "updated_at"]
    list_filter = ["status", "channel", "event"]
    search_fields = ["target", "alert__budget__name"]
    list_select_related = ["alert__budget"]
    fields = ["event", "alert", "channel", "target", "status", "attempts", "last_error", "payload", "created_at",
              "updated_at", "delivered_at"]
    readonly_fields = fields
    actions = ["retry_dead"]
    show_full_result_count = False

    @admin.display(description="Last error")
    def short_error(self, obj: AlertDelivery) -> str:
        return obj.last_error[:80] + ("…" if len(obj.last_error) > 80 else "")

    def has_retry_permission(self, request: HttpRequest) -> bool:
        return request.user.has_perm("billing.change_alertdelivery")

    @admin.action(description="Retry selected dead deliveries", permissions=["retry"])
    def retry_dead(self, request: HttpRequest, queryset: QuerySet) -> None:
        ids = list(queryset.values_list("id", flat=True))
        count = alert_deliveries_retry(ids=ids, actor=user_actor(request.user))
        skipped = len(ids) - count
        self.message_user(request, f"{count} dead deliver{'y' if count == 1 else 'ies'} enqueued again"
                                   + (f"; {skipped} not dead, left alone." if skipped else "."),
                          messages.SUCCESS if count else messages.WARNING)


@admin.register(UsageRollup)
class UsageRollupAdmin(ReadOnlyAdminMixin, admin.ModelAdmin):
    """Read-only: rebuilt per UTC day by the rollup_usage beat task."""

    list_display = ["day", "model", "agent", "api_key", "requests", "calls", "prompt_tokens", "completion_tokens",
                    "cost_usd", "built_at"]
    list_filter = ["day"]
    search_fields = ["model", "agent__name", "api_key__prefix"]
    list_select_related = ["agent", "api_key"]
    date_hierarchy = "day"
    show_full_result_count = False

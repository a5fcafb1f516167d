"""Billing data: prices per model, one usage record per model call, budgets and their spend.

Money is Decimal everywhere (USD). Costs are computed per 1M tokens:
    cost = prompt_tokens × input_per_1m / 1e6 + completion_tokens × output_per_1m / 1e6
(cached prompt tokens at cached_input_per_1m when the upstream reports them).
"""

from __future__ import annotations

from decimal import Decimal

from django.core.validators import MinValueValidator
from django.db import models


USD = {"max_digits": 18, "decimal_places": 8}
PRICE = {"max_digits": 12, "decimal_places": 6, "validators": [MinValueValidator(Decimal("0"))]}


class ModelPrice(models.Model):
    """List price of a model from `effective_from` on (the newest row not in the future applies)."""

    model = models.CharField(max_length=200, db_index=True, help_text='As agents name it, e.g. "openai/gpt-4o-mini".')
    input_per_1m = models.DecimalField(**PRICE, help_text="USD per 1M prompt tokens.")
    cached_input_per_1m = models.DecimalField(**PRICE, null=True, blank=True,
                                              help_text="USD per 1M cached prompt tokens (empty: the input price).")
    output_per_1m = models.DecimalField(**PRICE, help_text="USD per 1M completion tokens.")
    effective_from = models.DateTimeField()
    source = models.CharField(max_length=200, blank=True, help_text="Where the price comes from (seed file, admin).")
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["model", "-effective_from"]
        constraints = [models.UniqueConstraint(fields=["model", "effective_from"], name="modelprice_unique")]

    def __str__(self) -> str:
        return f"{self.model} from {self.effective_from:%Y-%m-%d}"


class UsageRecord(models.Model):
    """One model call of a run (tool-loop steps, fallbacks and failed calls the upstream billed)."""

    created_at = models.DateTimeField(db_index=True)
    run = models.ForeignKey("agents.Run", null=True, blank=True, on_delete=models.SET_NULL, related_name="usage")
    api_key = models.ForeignKey("governance.ApiKey", null=True, blank=True, on_delete=models.SET_NULL,
                                related_name="usage")
    agent = models.ForeignKey("agents.Agent", null=True, blank=True, on_delete=models.SET_NULL, related_name="usage")
    model = models.CharField(max_length=200)
    session_id = models.UUIDField(null=True, blank=True)
    request_id = models.CharField(max_length=128, blank=True)
    variant = models.CharField(max_length=100, blank=True, help_text="Experiment variant, when one applied.")
    prompt_tokens = models.PositiveIntegerField(default=0)
    cached_prompt_tokens = models.PositiveIntegerField(default=0)
    completion_tokens = models.PositiveIntegerField(default=0)
    cost_usd = models.DecimalField(**USD, default=Decimal("0"))
    # True when the upstream reported no usage and the tokens were counted offline.
    estimated = models.BooleanField(default=False)
    # False when the model had no price and the default price was used.
    priced = models.BooleanField(default=True)
    # True on the first usage record of its run (the one that counts it as a request); records
    # without a run: False.
    starts_run = models.BooleanField(default=False)

    class Meta:
        ordering = ["-created_at"]
        indexes = [
            models.Index(fields=["api_key", "created_at"], name="usage_key_time"),
            models.Index(fields=["agent", "created_at"], name="usage_agent_time"),
            models.Index(fields=["model", "created_at"], name="usage_model_time"),
        ]

    def __str__(self) -> str:
        return f"{self.model} {self.cost_usd} USD"


class Budget(models.Model):
    class Scope(models.TextChoices):
        GLOBAL = "global"
        AGENT = "agent"
        KEY = "key"
        KEY_AGENT = "key_agent"

    class Period(models.TextChoices):
        DAY = "day"
        WEEK = "week"
        MONTH = "month"
        TOTAL = "total"

    name = models.CharField(max_length=100, blank=True)
    scope = models.CharField(max_length=16, choices=Scope.choices)
    api_key = models.ForeignKey("governance.ApiKey", null=True, blank=True, on_delete=models.CASCADE,
                                related_name="budgets")
    agent = models.ForeignKey("agents.Agent", null=True, blank=True, on_delete=models.CASCADE, related_name="budgets")
    period = models.CharField(max_length=16, choices=Period.choices, default=Period.MONTH)
    limit_usd = models.DecimalField(**USD, validators=[MinValueValidator(Decimal("0"))])
    # Hard budgets refuse requests (402) that could overspend; soft ones only alert.
    hard = models.BooleanField(default=True)
    alert_thresholds = models.JSONField(default=list, blank=True, help_text="Percentages, default 50, 75, 90, 100.")
    alert_emails = models.CharField(max_length=1000, blank=True,
                                    help_text="Comma-separated addresses for alerts (default: BUDGET_ALERT_EMAILS).")
    alert_webhook_url = models.URLField(max_length=1000, blank=True,
                                        help_text="POSTed a JSON alert (default: BUDGET_ALERT_WEBHOOK_URL).")
    enabled = models.BooleanField(default=True)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["scope", "id"]

    def __str__(self) -> str:
        return self.name or f"{self.scope} {self.period} {self.limit_usd} USD"


class BudgetSpend(models.Model):
    """A budget's money in one period (UTC boundaries): settled spend and open reservations.

    The row is the lock: reservations update it under SELECT ... FOR UPDATE (PostgreSQL) or an
    IMMEDIATE transaction (SQLite), so concurrent requests on any worker never overspend."""

    budget = models.ForeignKey(Budget, on_delete=models.CASCADE, related_name="spends")
    period_start = models.DateTimeField()
    spent_usd = models.DecimalField(**USD, default=Decimal("0"))
    reserved_usd = models.DecimalField(**USD, default=Decimal("0"))
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        constraints = [models.UniqueConstraint(fields=["budget", "period_start"], name="budgetspend_unique")]

    def __str__(self) -> str:
        return f"{self.budget_id}@{self.period_start:%Y-%m-%d}"


class BudgetAlert(models.Model):
    """A budget crossed one of its thresholds in one period. The unique constraint is what makes
    each threshold fire once per period, whichever worker notices first."""

    budget = models.ForeignKey(Budget, on_delete=models.CASCADE, related_name="alerts")
    period_start = models.DateTimeField()
    threshold = models.PositiveSmallIntegerField(help_text="Percent of the limit.")
    spent_usd = models.DecimalField(**USD, help_text="Spend when the threshold was crossed.")
    limit_usd = models.DecimalField(**USD)
    created_at = models.DateTimeField(auto_now_add=True, db_index=True)

    class Meta:
        ordering = ["-created_at"]
        constraints = [models.UniqueConstraint(fields=["budget", "period_start", "threshold"],
                                               name="budgetalert_once_per_period")]

    def __str__(self) -> str:
        return f"{self.budget} {self.threshold}% @{self.period_start:%Y-%m-%d}"


class AlertDelivery(models.Model):
    """One delivery of an alert to one channel (an e-mail recipient list or a webhook). A delivery
    that keeps failing after its retries ends as `dead` (the dead-letter record)."""

    class Channel(models.TextChoices):
        EMAIL = "email"
        WEBHOOK = "webhook"

    class Status(models.TextChoices):
        PENDING = "pending"
        SENT = "sent"
        DEAD = "dead"

    # A budget's alert; None for another operational notice (billing.alerts.notice_send: an
    # experiment's canary rolled back), whose `event` and `payload` say what it is.
    alert = models.ForeignKey(BudgetAlert, null=True, blank=True, on_delete=models.CASCADE, related_name="deliveries")
    event = models.CharField(max_length=64, default="budget.alert")
    payload = models.JSONField(default=dict, blank=True, help_text="A notice's subject, text and webhook body.")
    channel = models.CharField(max_length=16, choices=Channel.choices)
    target = models.CharField(max_length=2000, help_text="E-mail addresses (comma-separated) or the webhook URL.")
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.PENDING, db_index=True)
    attempts = models.PositiveIntegerField(default=0)
    last_error = models.TextField(blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)
    delivered_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at"]
        verbose_name_plural = "alert deliveries"

    def __str__(self) -> str:
        return f"{self.channel} {self.status}"


class UsageRollup(models.Model):
    """Usage of one UTC day per (agent, model, key), for the dashboard and reports at millions of
    usage records. A day's rows are rebuilt as a whole (delete + insert in one transaction);
    days not rolled up yet are aggregated from UsageRecord directly."""

    day = models.DateField()
    agent = models.ForeignKey("agents.Agent", null=True, blank=True, on_delete=models.SET_NULL, related_name="+")
    api_key = models.ForeignKey("governance.ApiKey", null=True, blank=True, on_delete=models.SET_NULL, related_name="+")
    model = models.CharField(max_length=200)
    requests = models.PositiveIntegerField(default=0, help_text="Runs whose first usage record falls in this row.")
    calls = models.PositiveIntegerField(default=0, help_text="Usage records (model calls).")
    prompt_tokens = models.BigIntegerField(default=0)
    completion_tokens = models.BigIntegerField(default=0)
    cost_usd = models.DecimalField(**USD, default=Decimal("0"))
    built_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["-day"]
        indexes = [models.Index(fields=["day"], name="rollup_day")]

    def __str__(self) -> str:
        return f"{self.day} {self.model} {self.cost_usd} USD"

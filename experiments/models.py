"""Experiments on an agent's configuration: A/B tests, canary rollouts and shadow traffic.

An Experiment belongs to one agent and has Variants whose weights sum to 100; the control
variant is the agent as it is, every other variant overrides some of its configuration (model,
fallback models, system prompt, temperature, max_tokens, skills; None: inherit). At most one
experiment per agent is running (a partial unique constraint, checked again by the services
with a clear error). Runs served by an experiment carry its id and the variant's name
(agents.Run.experiment_id / variant). A ShadowRun is a background copy of a live run answered
by the shadow variant, stored beside it and never billed to the caller.
"""

from __future__ import annotations

from decimal import Decimal

from django.core.validators import MaxValueValidator, MinValueValidator
from django.db import models

from agents.models import Agent, Run, model_validator, name_validator

USD = {"max_digits": 18, "decimal_places": 8}
DEFAULT_CANARY_STEPS = [5, 25, 50, 100]


class Experiment(models.Model):
    class Status(models.TextChoices):
        DRAFT = "draft"
        RUNNING = "running"
        PAUSED = "paused"
        FINISHED = "finished"

    class Mode(models.TextChoices):
        AB = "ab", "A/B test"
        CANARY = "canary", "Canary rollout"

    class CanaryState(models.TextChoices):
        NONE = "", "—"
        RAMPING = "ramping"
        COMPLETED = "completed"  # reached its last step
        ROLLED_BACK = "rolled_back"

    name = models.CharField(max_length=100, unique=True, validators=[name_validator])
    description = models.TextField(blank=True)
    agent = models.ForeignKey(Agent, on_delete=models.CASCADE, related_name="experiments")
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.DRAFT, db_index=True)
    mode = models.CharField(max_length=16, choices=Mode.choices, default=Mode.AB)
    # Only callers for whom this feature flag is on enter (governance.flags); empty: everybody.
    flag = models.CharField(max_length=100, blank=True, help_text="Feature flag gating who enters (optional).")
    min_sample = models.PositiveIntegerField(
        default=100, validators=[MinValueValidator(2), MaxValueValidator(10_000_000)],
        help_text="Requests per variant before the comparisons are read as conclusive.")
    started_at = models.DateTimeField(null=True, blank=True)
    ended_at = models.DateTimeField(null=True, blank=True)
    # Canary rollouts: the candidate variant's share goes through `canary_steps` (percent), one
    # step every `canary_interval_minutes`, checked against the control before each step.
    canary_steps = models.JSONField(default=list, blank=True)
    canary_step = models.PositiveSmallIntegerField(default=0, help_text="Index of the current step.")
    canary_interval_minutes = models.PositiveIntegerField(default=60, validators=[MinValueValidator(1)])
    canary_next_at = models.DateTimeField(null=True, blank=True)
    canary_step_started_at = models.DateTimeField(null=True, blank=True)
    canary_max_error_rate_delta = models.FloatField(
        default=0.05, validators=[MinValueValidator(0.0), MaxValueValidator(1.0)],
        help_text="Roll back when the candidate's error rate exceeds the control's by more than this.")
    canary_max_p95_ratio = models.FloatField(
        default=1.5, validators=[MinValueValidator(1.0)],
        help_text="Roll back when the candidate's p95 latency exceeds the control's times this.")
    canary_min_sample = models.PositiveIntegerField(
        default=20, validators=[MinValueValidator(1)],
        help_text="Requests of the candidate in the step before its figures are judged.")
    canary_state = models.CharField(max_length=16, choices=CanaryState.choices, blank=True, default="")
    # Shadow traffic: this share of live requests is also answered by the shadow variant.
    shadow_variant = models.ForeignKey("Variant", null=True, blank=True, on_delete=models.SET_NULL,
                                       related_name="+")
    shadow_percent = models.PositiveSmallIntegerField(default=0, validators=[MaxValueValidator(100)])
    # The variant promoted to the agent's configuration when the experiment finished.
    promoted_variant = models.CharField(max_length=100, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["-created_at", "-id"]
        constraints = [models.UniqueConstraint(fields=["agent"], condition=models.Q(status="running"),
                                               name="experiment_one_running_per_agent")]

    def __str__(self) -> str:
        return self.name


class Variant(models.Model):
    OVERRIDES = ("model", "fallback_models", "system_prompt", "temperature", "max_tokens", "skills")

    experiment = models.ForeignKey(Experiment, on_delete=models.CASCADE, related_name="variants")
    name = models.CharField(max_length=64, validators=[name_validator])
    weight = models.PositiveSmallIntegerField(validators=[MaxValueValidator(100)],
                                              help_text="Percent of the experiment's traffic.")
    is_control = models.BooleanField(default=False, help_text="The agent as it is (no overrides).")
    model = models.CharField(max_length=200, blank=True, validators=[model_validator])
    fallback_models = models.JSONField(null=True, blank=True)
    system_prompt = models.TextField(null=True, blank=True)
    temperature = models.FloatField(null=True, blank=True,
                                    validators=[MinValueValidator(0.0), MaxValueValidator(2.0)])
    max_tokens = models.PositiveIntegerField(null=True, blank=True,
                                             validators=[MinValueValidator(1), MaxValueValidator(200_000)])
    skills = models.JSONField(null=True, blank=True, help_text="Skill names replacing the agent's; empty: inherit.")

    class Meta:
        ordering = ["experiment", "-is_control", "id"]
        constraints = [models.UniqueConstraint(fields=["experiment", "name"], name="variant_unique_name")]

    def __str__(self) -> str:
        return self.name

    def overrides(self) -> dict:
        """What this variant changes (the control changes nothing)."""
        if self.is_control:
            return {}
        out: dict = {}
        if self.model:
            out["model"] = self.model
        for name in ("fallback_models", "system_prompt", "temperature", "max_tokens", "skills"):
            value = getattr(self, name)
            if value is not None:
                out[name] = value
        return out


class ShadowRun(models.Model):
    """A live run answered again, in the background, by an experiment's shadow variant."""

    class Status(models.TextChoices):
        QUEUED = "queued"
        SUCCEEDED = "succeeded"
        FAILED = "failed"
        SKIPPED = "skipped"  # the shadow spend cap was reached

    experiment = models.ForeignKey(Experiment, on_delete=models.CASCADE, related_name="shadow_runs")
    variant = models.CharField(max_length=64)
    live_run = models.ForeignKey(Run, on_delete=models.CASCADE, related_name="shadow_runs")
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.QUEUED, db_index=True)
    # The conversation the live run was sent (masked when the agent masks transcripts).
    messages = models.JSONField(default=list, blank=True)
    model = models.CharField(max_length=200, blank=True)
    output = models.TextField(blank=True)
    prompt_tokens = models.PositiveIntegerField(default=0)
    completion_tokens = models.PositiveIntegerField(default=0)
    cost_usd = models.DecimalField(**USD, default=Decimal("0"))
    latency_ms = models.PositiveIntegerField(null=True, blank=True)
    error_code = models.CharField(max_length=64, blank=True)
    created_at = models.DateTimeField(auto_now_add=True, db_index=True)
    finished_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at", "-id"]

    def __str__(self) -> str:
        return f"shadow {self.variant} of {self.live_run_id}"

"""Governance data: API keys, the audit log, idempotency records and feature flags."""

from __future__ import annotations

from django.conf import settings
from django.db import NotSupportedError, models


class ApiKey(models.Model):
    class Role(models.TextChoices):
        ADMIN = "admin", "Admin"
        DEVELOPER = "developer", "Developer"
        CLIENT = "client", "Client"

    name = models.CharField(max_length=100)
    # The non-secret part of the key, shown in the admin, logs and audit entries.
    prefix = models.CharField(max_length=32, unique=True, editable=False)
    # sha256 of the whole key; the secret itself is shown once and never stored.
    secret_hash = models.CharField(max_length=64, editable=False)
    role = models.CharField(max_length=16, choices=Role.choices, default=Role.CLIENT)
    # Which agents the key may call: all of them (all_agents), or only those linked in `agents`.
    # An explicit state, never inferred from an empty list: deleting a key's agents (a cascade
    # removes the links) leaves a restricted key with none, i.e. it may call no agent. The
    # default is the closed one, so a key made without saying "all" can do nothing.
    all_agents = models.BooleanField(default=False, help_text="The key may call every agent; "
                                     "otherwise only the agents selected below (none selected: no agent).")
    agents = models.ManyToManyField("agents.Agent", blank=True, related_name="api_keys")
    # Likewise for skills: all of an agent's skills (all_skills), or only those named in
    # allowed_skills (empty: none are offered to the model).
    all_skills = models.BooleanField(default=False, help_text="The key may have every skill of an agent offered "
                                     "to the model; otherwise only those in allowed_skills ([]: none).")
    allowed_skills = models.JSONField(default=list, blank=True)
    # Requests and tokens per minute (sliding window); empty means no limit.
    rate_limit_rpm = models.PositiveIntegerField(null=True, blank=True)
    rate_limit_tpm = models.PositiveIntegerField(null=True, blank=True)
    enabled = models.BooleanField(default=True)
    expires_at = models.DateTimeField(null=True, blank=True)
    revoked_at = models.DateTimeField(null=True, blank=True)
    last_used_at = models.DateTimeField(null=True, blank=True)
    created_by = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL,
                                   related_name="+")
    created_at = models.DateTimeField(auto_now_add=True)
    # Rotation keeps the key (its prefix, grants, history) and replaces its secret; the previous
    # secret keeps working until previous_secret_expires_at (the grace period).
    rotated_at = models.DateTimeField(null=True, blank=True)
    previous_secret_hash = models.CharField(max_length=64, blank=True, editable=False)
    previous_secret_expires_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at"]
        verbose_name = "API key"

    def __str__(self) -> str:
        return f"{self.name} ({self.prefix})"


class AuditLogQuerySet(models.QuerySet):
    """Bulk writes bypass signals: refuse them (PostgreSQL's trigger refuses them too)."""

    def update(self, **kwargs):
        raise NotSupportedError("The audit log is append-only.")

    def bulk_update(self, *args, **kwargs):
        raise NotSupportedError("The audit log is append-only.")

    def bulk_create(self, *args, **kwargs):
        raise NotSupportedError("Append through governance.audit.audit_record.")


class AuditLog(models.Model):
    """Append-only, hash-chained record of every security- or money-relevant event.

    Each row's `hash` covers its own fields and the previous row's hash, so altering or
    deleting a row breaks the chain (manage.py verify_audit_log). The model refuses updates
    and deletes; on PostgreSQL a trigger refuses them too.
    """

    class Outcome(models.TextChoices):
        SUCCESS = "success"
        DENIED = "denied"
        BLOCKED = "blocked"
        ERROR = "error"

    timestamp = models.DateTimeField(db_index=True)
    # "key:<prefix>", "user:<username>" or "system".
    actor = models.CharField(max_length=160, db_index=True)
    action = models.CharField(max_length=64, db_index=True)
    target = models.CharField(max_length=200, blank=True)
    request_id = models.CharField(max_length=128, blank=True, db_index=True)
    client_ip = models.GenericIPAddressField(null=True, blank=True)
    outcome = models.CharField(max_length=16, choices=Outcome.choices, default=Outcome.SUCCESS)
    # Masked (governance.masking) before it is stored.
    details = models.JSONField(default=dict, blank=True)
    # The entry's place in the chain and its hash; on PostgreSQL empty until the sequencer
    # chains the entry (governance.audit), then never changed.
    seq = models.BigIntegerField(null=True, blank=True, unique=True, editable=False)
    prev_hash = models.CharField(max_length=64, null=True, blank=True, editable=False)
    hash = models.CharField(max_length=64, null=True, blank=True, unique=True, editable=False)

    objects = AuditLogQuerySet.as_manager()

    class Meta:
        ordering = ["-id"]
        # The sequencer's scan: the entries still to chain, in id order.
        indexes = [models.Index(fields=["id"], name="auditlog_unchained", condition=models.Q(seq__isnull=True))]
        verbose_name = "audit log entry"
        verbose_name_plural = "audit log"

    def __str__(self) -> str:
        return f"{self.timestamp:%Y-%m-%d %H:%M:%S} {self.actor} {self.action} {self.target}"


class IdempotencyRecord(models.Model):
    """The first response to (API key, Idempotency-Key): replayed to retries of the same request."""

    class State(models.TextChoices):
        RUNNING = "running"
        DONE = "done"

    api_key = models.ForeignKey(ApiKey, on_delete=models.CASCADE, related_name="idempotency_records")
    key = models.CharField(max_length=255)
    # sha256 of method, path and body: the same key with another request is refused.
    request_hash = models.CharField(max_length=64)
    state = models.CharField(max_length=16, choices=State.choices, default=State.RUNNING)
    status_code = models.PositiveSmallIntegerField(null=True, blank=True)
    content_type = models.CharField(max_length=100, blank=True)
    headers = models.JSONField(default=dict, blank=True)
    body = models.BinaryField(blank=True, default=b"")
    created_at = models.DateTimeField()
    expires_at = models.DateTimeField(db_index=True)

    class Meta:
        constraints = [models.UniqueConstraint(fields=["api_key", "key"], name="idempotency_key_unique")]

    def __str__(self) -> str:
        return f"{self.api_key_id}:{self.key}"


class FeatureFlag(models.Model):
    """A switch evaluated per request: on for a deterministic share of callers, or for targets."""

    name = models.CharField(max_length=100, unique=True)
    description = models.TextField(blank=True)
    enabled = models.BooleanField(default=False)
    rollout_percentage = models.PositiveSmallIntegerField(default=100)
    # Targeting (any match turns the flag on for that caller when enabled); empty lists target nobody
    # specifically and the rollout percentage applies to everyone.
    target_key_prefixes = models.JSONField(default=list, blank=True)
    target_roles = models.JSONField(default=list, blank=True)
    target_agents = models.JSONField(default=list, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["name"]

    def __str__(self) -> str:
        return self.name

"""API keys (the governance issue deepens them with scopes, limits and rotation)."""

from __future__ import annotations

from django.conf import settings
from django.db import models


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
    # Agents this key may call; none selected means all.
    agents = models.ManyToManyField("agents.Agent", blank=True, related_name="api_keys")
    enabled = models.BooleanField(default=True)
    expires_at = models.DateTimeField(null=True, blank=True)
    revoked_at = models.DateTimeField(null=True, blank=True)
    last_used_at = models.DateTimeField(null=True, blank=True)
    created_by = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL,
                                   related_name="+")
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["-created_at"]
        verbose_name = "API key"

    def __str__(self) -> str:
        return f"{self.name} ({self.prefix})"

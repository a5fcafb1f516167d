"""The console for API keys.

The secret of a key exists only in the response to its creation: the add view calls the
service, shows the secret once in a message and keeps nothing but the hash. secret_hash is
never displayed.
"""

from __future__ import annotations

from typing import Any

from django import forms
from django.contrib import admin, messages
from django.db.models import Q, QuerySet
from django.http import HttpRequest
from django.template.defaultfilters import pluralize
from django.utils import timezone
from django.utils.html import format_html

from ..models import ApiKey
from ..services import api_key_create, api_key_revoke


def api_key_status(key: ApiKey) -> str:
    now = timezone.now()
    if key.revoked_at is not None:
        return "revoked"
    if key.expires_at is not None and key.expires_at <= now:
        return "expired"
    if not key.enabled:
        return "disabled"
    return "active"


class StatusFilter(admin.SimpleListFilter):
    title = "status"
    parameter_name = "status"

    def lookups(self, request: HttpRequest, model_admin: admin.ModelAdmin) -> list[tuple[str, str]]:
        return [("active", "Active"), ("revoked", "Revoked"), ("expired", "Expired"), ("disabled", "Disabled")]

    def queryset(self, request: HttpRequest, queryset: QuerySet) -> QuerySet:
        now = timezone.now()
        live = Q(revoked_at__isnull=True)
        unexpired = Q(expires_at__isnull=True) | Q(expires_at__gt=now)
        match self.value():
            case "active":
                return queryset.filter(live & unexpired, enabled=True)
            case "revoked":
                return queryset.filter(revoked_at__isnull=False)
            case "expired":
                return queryset.filter(live, expires_at__lte=now)
            case "disabled":
                return queryset.filter(live & unexpired, enabled=False)
        return queryset


class ApiKeyCreateForm(forms.ModelForm):
    class Meta:
        model = ApiKey
        fields = ["name", "role", "agents", "expires_at"]

    def clean_expires_at(self) -> Any:
        expires_at = self.cleaned_data.get("expires_at")
        if expires_at is not None and expires_at <= timezone.now():
            raise forms.ValidationError("A new key must expire in the future.")
        return expires_at


@admin.register(ApiKey)
class ApiKeyAdmin(admin.ModelAdmin):
    list_display = ["name", "prefix", "role", "enabled", "status", "expires_at", "last_used_at", "created_at"]
    list_filter = [StatusFilter, "role", "enabled"]
    search_fields = ["name", "=prefix"]
    autocomplete_fields = ["agents"]
    # Belt and braces: the field is not editable, but it must never reach a form or a page.
    exclude = ["secret_hash"]
    readonly_fields = ["prefix", "status", "revoked_at", "created_by", "created_at", "last_used_at"]
    add_fieldsets = [
        (None, {
            "fields": ["name", "role", "agents", "expires_at"],
            "description": "The key's secret is generated on save and shown once, on the next page.",
        }),
    ]
    fieldsets = [
        (None, {"fields": ["name", "role", "enabled", "agents", "expires_at"]}),
        ("State", {"fields": ["prefix", "status", "revoked_at", "created_by", "created_at", "last_used_at"]}),
    ]
    actions = ["revoke_selected"]

    def get_fieldsets(self, request: HttpRequest, obj: ApiKey | None = None) -> Any:
        return self.add_fieldsets if obj is None else self.fieldsets

    def get_form(self, request: HttpRequest, obj: ApiKey | None = None, change: bool = False, **kwargs: Any) -> Any:
        if obj is None:
            kwargs["form"] = ApiKeyCreateForm
        return super().get_form(request, obj, change=change, **kwargs)

    def save_model(self, request: HttpRequest, obj: ApiKey, form: forms.ModelForm, change: bool) -> None:
        if change:
            super().save_model(request, obj, form, change)
            return
        data = form.cleaned_data
        key, secret = api_key_create(
            name=data["name"],
            role=data["role"],
            agent_names=[agent.name for agent in data["agents"]],
            expires_at=data["expires_at"],
            created_by=request.user,
        )
        # The admin goes on with `obj` (redirect, history entry): make it the stored key.
        for field in ApiKey._meta.concrete_fields:
            setattr(obj, field.attname, getattr(key, field.attname))
        obj._state.adding = False
        obj._state.db = key._state.db
        # Only in this message, which lives until the next page renders it. Never passed to a
        # logger, and the admin history entry holds str(obj), i.e. the name and the prefix.
        messages.success(
            request,
            format_html('The secret of API key “{}” is <code>{}</code>. Copy it now: it will not be shown again.',
                        key.name, secret),
        )

    def save_related(self, request: HttpRequest, form: forms.ModelForm, formsets: Any, change: bool) -> None:
        if change:
            super().save_related(request, form, formsets, change)
        # On add, api_key_create already set the agents in its transaction.

    @admin.display(description="Status")
    def status(self, obj: ApiKey) -> str:
        status = api_key_status(obj)
        colour = {"active": "green", "revoked": "#ba2121", "expired": "#b26b00", "disabled": "grey"}[status]
        return format_html('<span style="color: {}">{}</span>', colour, status)

    @admin.action(description="Revoke selected keys", permissions=["change"])
    def revoke_selected(self, request: HttpRequest, queryset: QuerySet) -> None:
        keys = list(queryset.filter(revoked_at__isnull=True))
        for key in keys:
            api_key_revoke(api_key=key)
        n = len(keys)
        self.message_user(request, f"Revoked {n} key{pluralize(n)}.", messages.SUCCESS)

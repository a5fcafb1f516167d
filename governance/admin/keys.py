"""The console for API keys.

The secret of a key exists only in the response to its creation or rotation: the add view and
the rotate action call the services, show the secret once in a message (session storage: it
lives until the next page renders it) and keep nothing but the hash. Hashes are never displayed.
Every change (add, edit, rotate, revoke) goes through a service, which writes the audit entry
with the actor "user:<username>".
"""

from __future__ import annotations

from typing import Any

from django import forms
from django.conf import settings
from django.contrib import admin, messages
from django.db.models import QuerySet
from django.http import HttpRequest
from django.template.defaultfilters import pluralize
from django.utils import timezone
from django.utils.html import format_html

from agentplatform.errors import PlatformError
from agents.admin import PrettyJSONMixin

from ..keys import STATUSES, api_key_status, api_keys_with_status
from ..models import ApiKey
from ..services import api_key_create, api_key_revoke, api_key_rotate, api_key_update, user_actor

# Fields an edit in the admin may change (api_key_update's own list, as the form calls them).
EDITABLE = ["name", "role", "enabled", "all_agents", "agents", "all_skills", "allowed_skills", "rate_limit_rpm",
            "rate_limit_tpm", "expires_at"]


class StatusFilter(admin.SimpleListFilter):
    title = "status"
    parameter_name = "status"

    def lookups(self, request: HttpRequest, model_admin: admin.ModelAdmin) -> list[tuple[str, str]]:
        return [(status, status.capitalize()) for status in STATUSES]

    def queryset(self, request: HttpRequest, queryset: QuerySet) -> QuerySet:
        if self.value() in STATUSES:
            return api_keys_with_status(queryset, self.value())
        return queryset


class ApiKeyChangeForm(forms.ModelForm):
    class Meta:
        model = ApiKey
        fields = EDITABLE

    def clean_allowed_skills(self) -> Any:
        from agents.models import Skill

        names = self.cleaned_data.get("allowed_skills") or []
        if not isinstance(names, list) or not all(isinstance(n, str) and n for n in names):
            raise forms.ValidationError('A JSON list of skill names, such as ["calculator"]; [] for none '
                                        '(tick "all skills" for all).')
        missing = sorted(set(names) - set(Skill.objects.filter(name__in=names).values_list("name", flat=True)))
        if missing:
            raise forms.ValidationError(f"Unknown skills: {', '.join(missing)}.")
        return names

    def clean(self) -> dict[str, Any]:
        data = super().clean()
        # "All" and a list together would be two answers to one question: say which one.
        if data.get("all_agents") and data.get("agents"):
            self.add_error("agents", 'Untick "all agents" to limit the key to the agents selected here.')
        if data.get("all_skills") and data.get("allowed_skills"):
            self.add_error("allowed_skills", 'Untick "all skills" to limit the key to the skills listed here.')
        return data

    def _positive(self, name: str) -> Any:
        value = self.cleaned_data.get(name)
        if value is not None and value < 1:
            raise forms.ValidationError("At least 1; leave empty for no limit.")
        return value

    def clean_rate_limit_rpm(self) -> Any:
        return self._positive("rate_limit_rpm")

    def clean_rate_limit_tpm(self) -> Any:
        return self._positive("rate_limit_tpm")


class ApiKeyCreateForm(ApiKeyChangeForm):
    class Meta:
        model = ApiKey
        fields = [f for f in EDITABLE if f != "enabled"]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # A new key is for all agents and skills unless the form says otherwise, as with the API.
        self.fields["all_agents"].initial = True
        self.fields["all_skills"].initial = True

    def clean_expires_at(self) -> Any:
        expires_at = self.cleaned_data.get("expires_at")
        if expires_at is not None and expires_at <= timezone.now():
            raise forms.ValidationError("A new key must expire in the future.")
        return expires_at


@admin.register(ApiKey)
class ApiKeyAdmin(PrettyJSONMixin, admin.ModelAdmin):
    list_display = ["name", "prefix", "role", "enabled", "status", "expires_at", "last_used_at", "rotated_at",
                    "created_at"]
    list_filter = [StatusFilter, "role", "enabled"]
    search_fields = ["name", "=prefix"]
    autocomplete_fields = ["agents"]
    # Belt and braces: the fields are not editable, but hashes must never reach a form or a page.
    exclude = ["secret_hash", "previous_secret_hash"]
    readonly_fields = ["prefix", "status", "revoked_at", "created_by", "created_at", "last_used_at", "rotated_at",
                       "previous_secret_expires_at"]
    add_fieldsets = [
        (None, {
            "fields": ["name", "role", "all_agents", "agents", "all_skills", "allowed_skills", "rate_limit_rpm",
                       "rate_limit_tpm", "expires_at"],
            "description": "The key's secret is generated on save and shown once, on the next page. "
                           'Untick "all agents" to limit the key to the agents selected (none selected: no agent); '
                           'untick "all skills" to limit it to allowed_skills ([]: none); '
                           "empty rate limits = no limit.",
        }),
    ]
    fieldsets = [
        (None, {"fields": ["name", "role", "enabled", "all_agents", "agents", "all_skills", "allowed_skills",
                           "rate_limit_rpm", "rate_limit_tpm", "expires_at"]}),
        ("State", {"fields": ["prefix", "status", "revoked_at", "created_by", "created_at", "last_used_at",
                              "rotated_at", "previous_secret_expires_at"]}),
    ]
    actions = ["rotate_selected", "revoke_selected"]

    def get_fieldsets(self, request: HttpRequest, obj: ApiKey | None = None) -> Any:
        return self.add_fieldsets if obj is None else self.fieldsets

    def get_form(self, request: HttpRequest, obj: ApiKey | None = None, change: bool = False, **kwargs: Any) -> Any:
        kwargs["form"] = ApiKeyCreateForm if obj is None else ApiKeyChangeForm
        return super().get_form(request, obj, change=change, **kwargs)

    def save_model(self, request: HttpRequest, obj: ApiKey, form: forms.ModelForm, change: bool) -> None:
        data = form.cleaned_data
        if change:
            # The form has already set the new values on `obj`; the service compares them with the
            # stored row, so hand it a fresh copy and only the fields the form changed.
            fields = {name: data[name] for name in form.changed_data if name in EDITABLE}
            if "agents" in fields:
                fields["agents"] = [agent.name for agent in fields["agents"]]
            # The boxes say which scope the lists belong to, changed or not (unchanged values are not audited).
            fields.update(all_agents=data["all_agents"], all_skills=data["all_skills"])
            stored = ApiKey.objects.get(pk=obj.pk)
            api_key_update(api_key=stored, fields=fields, actor=user_actor(request.user))
            for field in ApiKey._meta.concrete_fields:
                setattr(obj, field.attname, getattr(stored, field.attname))
            return
        key, secret = api_key_create(
            name=data["name"],
            role=data["role"],
            all_agents=data["all_agents"],
            agent_names=[agent.name for agent in data["agents"]],
            all_skills=data["all_skills"],
            allowed_skills=data.get("allowed_skills") or [],
            rate_limit_rpm=data.get("rate_limit_rpm"),
            rate_limit_tpm=data.get("rate_limit_tpm"),
            expires_at=data["expires_at"],
            created_by=request.user,
            actor=user_actor(request.user),
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
        # api_key_create and api_key_update set the agents in their own transactions (and audit them).
        for formset in formsets:
            self.save_formset(request, form, formset, change=change)

    @admin.display(description="Status")
    def status(self, obj: ApiKey) -> str:
        status = api_key_status(obj)
        colour = {"active": "green", "revoked": "#ba2121", "expired": "#b26b00", "disabled": "grey"}[status]
        return format_html('<span style="color: {}">{}</span>', colour, status)

    @admin.action(description="Rotate selected keys", permissions=["change"])
    def rotate_selected(self, request: HttpRequest, queryset: QuerySet) -> None:
        grace = settings.API_KEY_ROTATION_GRACE_SECONDS
        rotated = 0
        for key in queryset.filter(revoked_at__isnull=True).order_by("name", "pk"):
            try:
                key, secret = api_key_rotate(api_key=key, grace_seconds=grace, actor=user_actor(request.user))
            except PlatformError as exc:
                self.message_user(request, f"{key}: {exc.message}", messages.ERROR)
                continue
            rotated += 1
            until = (f"until {timezone.localtime(key.previous_secret_expires_at):%Y-%m-%d %H:%M %Z}"
                     if key.previous_secret_expires_at else "no longer (no grace period)")
            # Shown once: session-stored messages are deleted when the next page renders them.
            messages.success(request, format_html(
                "The new secret of API key “{}” ({}) is <code>{}</code>. Copy it now: it will not be shown again. "
                "The previous secret keeps working {}.", key.name, key.prefix, secret, until))
        skipped = queryset.filter(revoked_at__isnull=False).count()
        note = f" Skipped {skipped} revoked key{pluralize(skipped)}." if skipped else ""
        self.message_user(request, f"Rotated {rotated} key{pluralize(rotated)}.{note}",
                          messages.SUCCESS if rotated else messages.WARNING)

    @admin.action(description="Revoke selected keys", permissions=["change"])
    def revoke_selected(self, request: HttpRequest, queryset: QuerySet) -> None:
        keys = list(queryset.filter(revoked_at__isnull=True))
        for key in keys:
            api_key_revoke(api_key=key, actor=user_actor(request.user))
        n = len(keys)
        self.message_user(request, f"Revoked {n} key{pluralize(n)}.", messages.SUCCESS)

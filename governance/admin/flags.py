"""The console for feature flags.

Targeting lists are typed as comma-separated names (a JSON list is accepted too). Saves drop
the cached flags on every worker (governance.flag_signals) and are audited with the staff
user as actor (AuditedAdminMixin; the entries themselves come from governance.audit).
"""

from __future__ import annotations

import json
import re
from typing import Any

from django import forms
from django.contrib import admin
from django.utils.html import format_html_join

from ..audit import AuditedAdminMixin
from ..flags import SKILL_FLAG_PREFIX, STREAMING_FLAG  # importing flags connects the cache invalidation
from ..models import ApiKey, FeatureFlag

_SPLIT = re.compile(r"[,\n]")


class NameListField(forms.CharField):
    """A list of names, typed as "a, b, c" (or a JSON list of strings); shown comma-separated."""

    widget = forms.TextInput(attrs={"size": 80})

    def __init__(self, **kwargs: Any) -> None:
        kwargs.setdefault("required", False)
        super().__init__(**kwargs)

    def prepare_value(self, value: Any) -> Any:
        if isinstance(value, (list, tuple)):
            return ", ".join(str(v) for v in value)
        return value

    def to_python(self, value: Any) -> list[str]:
        if isinstance(value, (list, tuple)):
            items = list(value)
        else:
            text = (super().to_python(value) or "").strip()
            if text.startswith("["):
                try:
                    items = json.loads(text)
                except ValueError:
                    raise forms.ValidationError("Not a valid JSON list: use a JSON list of strings or "
                                                "comma-separated names.") from None
                if not isinstance(items, list) or not all(isinstance(i, str) for i in items):
                    raise forms.ValidationError("A JSON list here must hold strings only.")
            else:
                items = _SPLIT.split(text) if text else []
        names: list[str] = []
        for item in items:
            if not isinstance(item, str):
                raise forms.ValidationError("Only names (strings) are allowed.")
            name = item.strip()
            if name and name not in names:
                names.append(name)
        return names


class FeatureFlagForm(forms.ModelForm):
    target_key_prefixes = NameListField(help_text="API key prefixes, comma-separated.")
    target_roles = NameListField(help_text="Roles, comma-separated: " + ", ".join(ApiKey.Role.values) + ".")
    target_agents = NameListField(help_text="Agent names, comma-separated.")
    rollout_percentage = forms.IntegerField(
        min_value=0, max_value=100, initial=100,
        help_text="Share of the callers not targeted below who get the flag (0–100), chosen by hashing "
                  "the flag name and the key prefix: stable per key.")

    class Meta:
        model = FeatureFlag
        fields = ["name", "description", "enabled", "rollout_percentage", "target_key_prefixes", "target_roles",
                  "target_agents"]

    def clean_name(self) -> str:
        name = self.cleaned_data["name"].strip()
        if not name or any(c.isspace() for c in name):
            raise forms.ValidationError("A flag name has no spaces, e.g. `streaming` or `skill.calculator`.")
        return name

    def clean_target_roles(self) -> list[str]:
        roles = self.cleaned_data["target_roles"]
        unknown = [r for r in roles if r not in ApiKey.Role.values]
        if unknown:
            raise forms.ValidationError(f"Unknown role(s): {', '.join(unknown)}. "
                                        f"Choose from {', '.join(ApiKey.Role.values)}.")
        return roles


@admin.register(FeatureFlag)
class FeatureFlagAdmin(AuditedAdminMixin, admin.ModelAdmin):
    form = FeatureFlagForm
    list_display = ["name", "enabled", "rollout_percentage", "targeting", "updated_at"]
    list_filter = ["enabled"]
    search_fields = ["name", "description"]
    readonly_fields = ["created_at", "updated_at"]
    fieldsets = [
        (None, {
            "fields": ["name", "description", "enabled"],
            "description": f"Flags the platform reads: <code>{STREAMING_FLAG}</code> (off: stream requests are "
                           f"refused) and <code>{SKILL_FLAG_PREFIX}&lt;skill name&gt;</code> (off: that skill is "
                           "not offered to the model). A disabled flag is off for everyone.",
        }),
        ("Who gets it", {
            "fields": ["rollout_percentage", "target_key_prefixes", "target_roles", "target_agents"],
            "description": "A caller matched by any target list gets the flag; everyone else falls in the "
                           "rollout percentage. Only the targets: rollout 0.",
        }),
        ("History", {"fields": ["created_at", "updated_at"]}),
    ]

    @admin.display(description="Targeting")
    def targeting(self, obj: FeatureFlag) -> str:
        parts = [(label, ", ".join(values)) for label, values in (
            ("keys", obj.target_key_prefixes), ("roles", obj.target_roles), ("agents", obj.target_agents)) if values]
        if not parts:
            return "—"
        return format_html_join("; ", "{}: {}", parts)

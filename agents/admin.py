"""The console for agents, skills, sessions, runs, messages and documents.

Runs and messages are history written by the runtime: view-only here, and big tables, so
their changelists skip the full count and search by exact, indexed values where they can.
"""

from __future__ import annotations

import copy
import json
import uuid
from datetime import timedelta
from typing import Any

from django import forms
from django.contrib import admin, messages
from django.db import models
from django.db.models import Count, IntegerField, OuterRef, Prefetch, Q, QuerySet, Subquery
from django.db.models.functions import Coalesce
from django.forms.fields import InvalidJSONInput
from django.forms.models import BaseInlineFormSet
from django.http import HttpRequest
from django.template.defaultfilters import pluralize
from django.urls import reverse
from django.utils import timezone
from django.utils.html import format_html, format_html_join
from django.utils.http import urlencode
from django.utils.text import Truncator

from agentplatform.admin_mixins import ReadOnlyAdminMixin
from governance.audit import AuditedAdminMixin, user_actor
from governance.masking import mask_data
from governance.models import ApiKey

from .models import Agent, AgentSkill, DeadLetter, Document, Message, Run, Session, Skill
from .runs import dead_letters_retry

# How many of a session's messages its change page shows inline (the latest ones); the
# rest are one click away in the filtered Message changelist.
SESSION_INLINE_MESSAGES = 100


# --- JSON edited as indented text ------------------------------------------------------


class PrettyJSONField(forms.JSONField):
    """A JSON form field that shows indented JSON and turns an empty box into the model default.

    Django's own returns None for an empty box, which a NOT NULL JSONField with blank=True
    then refuses at save time with an IntegrityError instead of a form error.
    """

    def __init__(self, *, empty: Any = None, **kwargs: Any) -> None:
        self.empty = empty
        super().__init__(**kwargs)

    def to_python(self, value: Any) -> Any:
        if not self.disabled and value in self.empty_values:
            return copy.deepcopy(self.empty)
        return super().to_python(value)

    def prepare_value(self, value: Any) -> Any:
        if isinstance(value, InvalidJSONInput):
            return value
        return json.dumps(value, indent=2, ensure_ascii=False, cls=self.encoder)


class PrettyJSONMixin:
    """Edit every JSONField of the model as indented JSON in a monospace textarea."""

    def formfield_for_dbfield(self, db_field: models.Field, request: HttpRequest, **kwargs: Any) -> Any:
        if isinstance(db_field, models.JSONField):
            kwargs.setdefault(
                "widget",
                forms.Textarea(attrs={"rows": 8, "cols": 80, "class": "vLargeTextField",
                                      "style": "font-family: monospace"}),
            )
            return db_field.formfield(form_class=PrettyJSONField, empty=db_field.get_default(), **kwargs)
        return super().formfield_for_dbfield(db_field, request, **kwargs)  # type: ignore[misc]


def pretty_json(value: Any) -> str:
    """Read-only display of a JSON value."""
    if value in (None, {}, []):
        return "—"
    return format_html('<pre style="margin: 0; white-space: pre-wrap">{}</pre>',
                       json.dumps(value, indent=2, ensure_ascii=False))


def changelist_link(model: type[models.Model], text: str, **filters: Any) -> str:
    url = reverse(f"admin:{model._meta.app_label}_{model._meta.model_name}_changelist")
    return format_html('<a href="{}?{}">{}</a>', url, urlencode(filters), text)


def _set_enabled(queryset: QuerySet, enabled: bool) -> int:
    # One save per row, not queryset.update(): post_save signals invalidate the cached
    # agent/skill the runtime resolves, and a bulk update would leave stale entries behind.
    changed = 0
    for obj in queryset.exclude(enabled=enabled):
        obj.enabled = enabled
        obj.save(update_fields=["enabled", "updated_at"])
        changed += 1
    return changed


# --- Skills ----------------------------------------------------------------------------------


@admin.register(Skill)
class SkillAdmin(AuditedAdminMixin, PrettyJSONMixin, admin.ModelAdmin):
    list_display = ["name", "kind", "enabled", "agent_count", "updated_at"]
    list_filter = ["kind", "enabled"]
    search_fields = ["name", "description"]
    readonly_fields = ["created_at", "updated_at"]
    fieldsets = [
        (None, {"fields": ["name", "description", "kind", "enabled"]}),
        ("Tool definition", {
            "fields": ["parameters", "config"],
            "description": "parameters: the JSON schema of the arguments, offered to the model as the tool's "
                           "parameters. config: options of a built-in skill, or "
                           '{"url": ..., "timeout_seconds": ..., "headers": {...}} for an HTTP skill.',
        }),
        ("Metadata", {"fields": ["created_at", "updated_at"]}),
    ]
    actions = ["enable_selected", "disable_selected"]

    def get_queryset(self, request: HttpRequest) -> QuerySet:
        return super().get_queryset(request).annotate(agent_count=Count("skill_agents", distinct=True))

    @admin.display(description="Agents", ordering="agent_count")
    def agent_count(self, obj: Skill) -> str:
        return changelist_link(Agent, str(obj.agent_count), skills__id__exact=obj.pk)

    @admin.action(description="Enable selected skills", permissions=["change"])
    def enable_selected(self, request: HttpRequest, queryset: QuerySet) -> None:
        n = _set_enabled(queryset, True)
        self.message_user(request, f"Enabled {n} skill{pluralize(n)}.", messages.SUCCESS)

    @admin.action(description="Disable selected skills", permissions=["change"])
    def disable_selected(self, request: HttpRequest, queryset: QuerySet) -> None:
        n = _set_enabled(queryset, False)
        self.message_user(request, f"Disabled {n} skill{pluralize(n)}.", messages.SUCCESS)


# --- Agents ----------------------------------------------------------------------------------


class AgentSkillInline(admin.TabularInline):
    model = AgentSkill
    fields = ["skill", "position"]
    autocomplete_fields = ["skill"]
    ordering = ["position", "id"]
    extra = 0
    verbose_name = "skill"
    verbose_name_plural = "Skills (offered to the model in this order)"


@admin.register(Agent)
class AgentAdmin(AuditedAdminMixin, PrettyJSONMixin, admin.ModelAdmin):
    list_display = ["name", "model", "enabled", "skill_names", "circuit_summary", "updated_at"]
    list_filter = ["enabled", "model"]
    search_fields = ["name", "description", "system_prompt", "model"]
    readonly_fields = ["circuits", "documents", "recent_runs", "created_at", "updated_at"]
    inlines = [AgentSkillInline]
    fieldsets = [
        ("Identity", {"fields": ["name", "description", "enabled"]}),
        ("Model", {
            "fields": ["model", "temperature", "max_tokens", "timeout_seconds", "max_retries", "fallback_models",
                       "circuits"],
            "description": 'fallback_models: a JSON list such as ["openai/gpt-4o-mini"], tried in order when '
                           "the primary model fails with a retryable error before answering.",
        }),
        ("Prompt", {"fields": ["system_prompt"]}),
        ("Metadata", {"fields": ["metadata", "documents", "recent_runs", "created_at", "updated_at"]}),
    ]
    actions = ["enable_selected", "disable_selected"]

    def get_queryset(self, request: HttpRequest) -> QuerySet:
        # One query for the skills of the whole page, in the agent's order.
        ordered = AgentSkill.objects.select_related("skill").order_by("position", "id")
        return super().get_queryset(request).prefetch_related(Prefetch("agent_skills", queryset=ordered))

    @admin.display(description="Skills")
    def skill_names(self, obj: Agent) -> str:
        return ", ".join(link.skill.name for link in obj.agent_skills.all()) or "—"

    def changelist_view(self, request: HttpRequest, extra_context: dict | None = None):
        self._circuit_cache = None  # read once per page, for every agent on it
        return super().changelist_view(request, extra_context)

    def _circuit_states(self, models: list[str]) -> dict:
        from asgiref.sync import async_to_sync

        from agentplatform.circuit import circuit_states

        return dict(zip(models, async_to_sync(circuit_states)(models)))

    @admin.display(description="Circuits")
    def circuit_summary(self, obj: Agent) -> str:
        """The worst circuit state among the agent's models (all agents on the page in one read)."""
        cache = getattr(self, "_circuit_cache", None)
        models = [obj.model, *(obj.fallback_models or [])]
        if cache is None or any(m not in cache for m in models):
            names = {m for a in Agent.objects.only("model", "fallback_models") for m in [a.model, *(a.fallback_models or [])]}
            cache = self._circuit_cache = self._circuit_states(sorted(names | set(models)))
        states = [cache[m].state for m in models]
        worst = next((s for s in ("open", "half_open") if s in states), "closed")
        if worst == "closed":
            return "closed"
        failing = ", ".join(m for m in models if cache[m].state == worst)
        return format_html('<strong style="color: var(--error-fg, #ba2121)">{}</strong>: {}', worst, failing)

    @admin.display(description="Circuit breakers")
    def circuits(self, obj: Agent) -> str:
        """Each model's circuit (agentplatform.circuit), as GET /api/v1/agents/{name}/health shows it."""
        if obj.pk is None:
            return "—"
        models = [obj.model, *(obj.fallback_models or [])]
        states = self._circuit_states(models)
        rows = []
        for model in models:
            info = states[model].as_dict()
            detail = ", ".join(f"{k}: {v}" for k, v in info.items() if k != "state" and v not in (None, 0, ""))
            rows.append((model, info["state"], f" ({detail})" if detail else ""))
        return format_html("<ul style='margin:0;padding-left:1em'>{}</ul>",
                           format_html_join("", "<li><code>{}</code>: <strong>{}</strong>{}</li>", rows))

    @admin.display(description="Documents")
    def documents(self, obj: Agent) -> str:
        if obj.pk is None:
            return "—"
        count = obj.documents.count()
        add_url = reverse("admin:agents_document_add") + "?" + urlencode({"agent": obj.pk})
        return format_html(
            '{} · <a href="{}">Add a document</a>',
            changelist_link(Document, f"{count} document{pluralize(count)}", agent__id__exact=obj.pk),
            add_url,
        )

    @admin.display(description="Recent runs")
    def recent_runs(self, obj: Agent) -> str:
        if obj.pk is None:
            return "—"
        # Counting only the last day keeps this on the (agent, -started_at) index, whatever
        # the size of the run table.
        last_day = obj.runs.filter(started_at__gte=timezone.now() - timedelta(days=1)).count()
        return format_html("{} ({} in the last 24 hours)",
                           changelist_link(Run, "View runs", agent__id__exact=obj.pk), last_day)

    @admin.action(description="Enable selected agents", permissions=["change"])
    def enable_selected(self, request: HttpRequest, queryset: QuerySet) -> None:
        n = _set_enabled(queryset, True)
        self.message_user(request, f"Enabled {n} agent{pluralize(n)}.", messages.SUCCESS)

    @admin.action(description="Disable selected agents", permissions=["change"])
    def disable_selected(self, request: HttpRequest, queryset: QuerySet) -> None:
        n = _set_enabled(queryset, False)
        self.message_user(request, f"Disabled {n} agent{pluralize(n)}.", messages.SUCCESS)


# --- Sessions and messages -------------------------------------------------------------------


class LatestMessagesFormSet(BaseInlineFormSet):
    """The session's latest SESSION_INLINE_MESSAGES messages, oldest first.

    Filtered with a subquery rather than sliced: the formset filters its queryset again.
    """

    def get_queryset(self) -> QuerySet:
        if not hasattr(self, "_latest_queryset"):
            qs = super().get_queryset()
            latest = qs.order_by("-created_at", "-id").values("pk")[:SESSION_INLINE_MESSAGES]
            self._latest_queryset = qs.filter(pk__in=latest).order_by("created_at", "id")
        return self._latest_queryset


class MessageInline(admin.TabularInline):
    model = Message
    formset = LatestMessagesFormSet
    fields = ["role", "short_content", "tool_calls_display", "tokens", "created_at"]
    readonly_fields = fields
    ordering = ["created_at", "id"]
    extra = 0
    can_delete = False
    show_change_link = True
    verbose_name_plural = f"Messages (the latest {SESSION_INLINE_MESSAGES})"

    @admin.display(description="Content")
    def short_content(self, obj: Message) -> str:
        return Truncator(obj.content).chars(200)

    @admin.display(description="Tool calls")
    def tool_calls_display(self, obj: Message) -> str:
        return pretty_json(obj.tool_calls)

    @admin.display(description="Tokens")
    def tokens(self, obj: Message) -> int:
        return obj.prompt_tokens + obj.completion_tokens


@admin.register(Session)
class SessionAdmin(PrettyJSONMixin, admin.ModelAdmin):
    list_display = ["id", "agent", "owner", "title", "message_count", "last_activity_at"]
    list_filter = ["agent"]
    list_select_related = ["agent", "api_key", "user"]
    date_hierarchy = "last_activity_at"
    search_fields = ["id", "title", "=api_key__prefix"]
    search_help_text = "Part of the session id or title, or an exact API key prefix."
    fields = ["id", "agent", "api_key", "user", "title", "metadata", "all_messages", "created_at",
              "last_activity_at"]
    # Sessions belong to the API: only their metadata is an operator's to edit.
    readonly_fields = [f for f in fields if f != "metadata"]
    inlines = [MessageInline]

    def get_queryset(self, request: HttpRequest) -> QuerySet:
        # A correlated subquery, not a JOIN + GROUP BY: the database counts messages only for
        # the sessions on the page (on the (session, created_at, id) index), not for all of them.
        counts = (Message.objects.filter(session=OuterRef("pk")).order_by().values("session")
                  .annotate(n=Count("*")).values("n"))
        return super().get_queryset(request).annotate(
            message_count=Coalesce(Subquery(counts, output_field=IntegerField()), 0)
        )

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    @admin.display(description="Owner")
    def owner(self, obj: Session) -> str:
        if obj.api_key_id:
            return f"key {obj.api_key.prefix}"
        if obj.user_id:
            return obj.user.get_username()
        return "—"

    @admin.display(description="Messages", ordering="message_count")
    def message_count(self, obj: Session) -> int:
        return obj.message_count

    @admin.display(description="All messages")
    def all_messages(self, obj: Session) -> str:
        return changelist_link(Message, f"{obj.message_count} message{pluralize(obj.message_count)}",
                               session__id__exact=obj.pk)


class ReadOnlyHistoryMixin(ReadOnlyAdminMixin):
    """History written by the runtime: nobody adds or edits it; only superusers delete it."""

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return request.user.is_superuser


@admin.register(Message)
class MessageAdmin(ReadOnlyHistoryMixin, admin.ModelAdmin):
    list_display = ["session", "role", "short_content", "created_at"]
    list_filter = ["role"]
    list_select_related = ["session"]
    search_fields = ["content"]
    show_full_result_count = False
    fields = ["session", "run", "role", "name", "tool_call_id", "content", "tool_calls_display",
              "prompt_tokens", "completion_tokens", "created_at"]
    readonly_fields = ["tool_calls_display"]

    @admin.display(description="Content")
    def short_content(self, obj: Message) -> str:
        return Truncator(obj.content).chars(80)

    @admin.display(description="Tool calls")
    def tool_calls_display(self, obj: Message) -> str:
        return pretty_json(obj.tool_calls)


# --- Runs ------------------------------------------------------------------------------------


@admin.register(Run)
class RunAdmin(ReadOnlyHistoryMixin, admin.ModelAdmin):
    list_display = ["short_id", "agent", "status", "transport", "model", "total_tokens", "latency_ms",
                    "started_at"]
    list_filter = ["status", "transport", "agent", "model"]
    list_select_related = ["agent", "api_key"]
    date_hierarchy = "started_at"
    # Shown in the search box's help; get_search_results does the (exact, indexed) work.
    search_fields = ["=id", "=request_id", "=api_key__prefix"]
    search_help_text = "An exact run id, request id or API key prefix."
    show_full_result_count = False
    fieldsets = [
        (None, {"fields": ["id", "agent", "session", "api_key", "status", "transport", "model", "request_id"]}),
        ("Usage", {"fields": ["prompt_tokens", "completion_tokens", "total_tokens", "steps", "latency_ms"]}),
        ("Timing", {"fields": ["started_at", "finished_at"]}),
        ("Error", {"fields": ["error_code", "error_message"]}),
        ("Metadata", {"fields": ["metadata_display", "run_messages"]}),
        ("Async run", {"fields": ["queued_at", "attempts", "cancel_requested", "input_display", "callback_status",
                                  "callback_attempts", "callback_error", "callback_delivered_at"],
                       "classes": ["collapse"]}),
    ]
    readonly_fields = ["id", "metadata_display", "run_messages", "input_display"]

    def get_search_results(self, request: HttpRequest, queryset: QuerySet, search_term: str) -> tuple[QuerySet, bool]:
        # The admin's default (OR of LIKEs, through a join for the key) scans the whole table;
        # exact matches on the id, the request id and the key's id all use an index.
        term = search_term.strip()
        if not term:
            return queryset, False
        key_ids = list(ApiKey.objects.filter(prefix=term).values_list("id", flat=True))
        match = Q(request_id=term) | Q(api_key_id__in=key_ids)
        try:
            match |= Q(id=uuid.UUID(term))
        except ValueError:
            pass
        return queryset.filter(match), False

    @admin.display(description="Run", ordering="id")
    def short_id(self, obj: Run) -> str:
        return obj.id.hex[:8]

    @admin.display(description="Metadata")
    def metadata_display(self, obj: Run) -> str:
        return pretty_json(obj.metadata)

    @admin.display(description="Messages")
    def run_messages(self, obj: Run) -> str:
        return changelist_link(Message, "Messages of this run", run__id__exact=obj.pk)

    @admin.display(description="Input (masked)")
    def input_display(self, obj: Run) -> str:
        # The request an async run executes (kept until it succeeds): shown masked, as audit details are.
        return pretty_json(mask_data(obj.input)) if obj.input else "—"


class RetriedFilter(admin.SimpleListFilter):
    title = "retried"
    parameter_name = "retried"

    def lookups(self, request: HttpRequest, model_admin: Any) -> list[tuple[str, str]]:
        return [("no", "Not yet"), ("yes", "Retried")]

    def queryset(self, request: HttpRequest, queryset: QuerySet) -> QuerySet:
        if self.value() in ("yes", "no"):
            return queryset.filter(retried_at__isnull=self.value() == "no")
        return queryset


@admin.register(DeadLetter)
class DeadLetterAdmin(ReadOnlyAdminMixin, admin.ModelAdmin):
    """Async work that failed for good: failed or interrupted runs, callbacks out of retries, with
    their masked context. "Retry" queues the run (or sends the callback) again."""

    list_display = ["id", "task", "run_link", "error_code", "short_error", "attempts", "created_at", "retried_at"]
    list_filter = ["task", RetriedFilter, "error_code"]
    list_select_related = ["run", "run__agent"]
    search_fields = ["=run__id", "error_code"]
    search_help_text = "An exact run id, or an error code."
    date_hierarchy = "created_at"
    fields = ["run_link", "task", "error_code", "error_message", "attempts", "context_display", "created_at",
              "retried_at", "retried_by"]
    readonly_fields = fields
    actions = ["retry"]
    show_full_result_count = False

    @admin.display(description="Run", ordering="run")
    def run_link(self, obj: DeadLetter) -> str:
        url = reverse("admin:agents_run_change", args=[obj.run_id])
        return format_html('<a href="{}">{} ({})</a>', url, obj.run_id.hex[:8], obj.run.agent.name)

    @admin.display(description="Error")
    def short_error(self, obj: DeadLetter) -> str:
        return Truncator(obj.error_message).chars(80)

    @admin.display(description="Context (masked)")
    def context_display(self, obj: DeadLetter) -> str:
        return pretty_json(obj.context)

    def has_retry_permission(self, request: HttpRequest) -> bool:
        return request.user.has_perm("agents.change_deadletter")

    @admin.action(description="Retry selected dead letters", permissions=["retry"])
    def retry(self, request: HttpRequest, queryset: QuerySet) -> None:
        ids = list(queryset.values_list("id", flat=True))
        count = dead_letters_retry(ids=ids, actor=user_actor(request.user))
        skipped = len(ids) - count
        self.message_user(request, f"{count} dead letter{pluralize(count)} queued again"
                                   + (f"; {skipped} retried already, left alone." if skipped else "."),
                          messages.SUCCESS if count else messages.WARNING)


# --- Documents -------------------------------------------------------------------------------


@admin.register(Document)
class DocumentAdmin(admin.ModelAdmin):
    list_display = ["title", "agent", "source", "updated_at"]
    list_filter = ["agent"]
    list_select_related = ["agent"]
    search_fields = ["title", "content"]
    autocomplete_fields = ["agent"]
    fields = ["agent", "title", "source", "content", "created_at", "updated_at"]
    readonly_fields = ["created_at", "updated_at"]

"""Experiments in the admin: experiments with their variants inline, a results page (tables,
Chart.js charts, shadow runs side by side with the live answers), and the actions: start,
pause, resume, finish, promote a winner. Status changes and promotions go through
experiments.services (validated, audited with the staff user); a form save validates the
variants with the same rules and is audited as "experiment.updated"."""

from __future__ import annotations

from typing import Any

from django import forms
from django.contrib import admin, messages
from django.core.exceptions import PermissionDenied, ValidationError
from django.db.models import QuerySet
from django.forms.models import BaseInlineFormSet
from django.http import HttpRequest, HttpResponse, HttpResponseRedirect
from django.shortcuts import get_object_or_404
from django.template.response import TemplateResponse
from django.urls import path, reverse
from django.utils.html import format_html

from agentplatform.csp import page_csp
from agentplatform.errors import PlatformError
from agentplatform.methods import http_methods
from agents.models import Message
from governance.audit import user_actor

from .models import Experiment, ShadowRun, Variant
from .results import experiment_results
from .services import experiment_audit_deleted, experiment_audit_saved, experiment_promote, experiment_update, validate_variants

SIDE_BY_SIDE = 20


class VariantFormSet(BaseInlineFormSet):
    def clean(self) -> None:
        super().clean()
        if any(self.errors):
            return
        rows = [{k: v for k, v in form.cleaned_data.items() if k in ("name", "weight", "is_control", *Variant.OVERRIDES)}
                for form in self.forms if form.cleaned_data and not form.cleaned_data.get("DELETE")]
        try:
            validate_variants(rows, mode=self.instance.mode or Experiment.Mode.AB)
        except PlatformError as exc:
            raise ValidationError(exc.message) from None
        if self.instance.pk and self.instance.status == Experiment.Status.RUNNING and self.has_changed():
            raise ValidationError("Pause the experiment before changing its variants.")


class InheritedJSONField(forms.JSONField):
    """A variant's list override as compact JSON; an empty box is None (inherit the agent's)."""

    def prepare_value(self, value):
        return "" if value is None else super().prepare_value(value)


class VariantInline(admin.TabularInline):
    model = Variant
    formset = VariantFormSet
    extra = 0
    min_num = 2
    fields = ["name", "weight", "is_control", "model", "fallback_models", "system_prompt", "temperature",
              "max_tokens", "skills"]

    def formfield_for_dbfield(self, db_field, request, **kwargs):
        if db_field.name == "system_prompt":
            # Empty: inherit the agent's prompt (None), not replace it with an empty one.
            kwargs.update(widget=forms.Textarea(attrs={"rows": 2, "cols": 32, "placeholder": "inherit"}),
                          empty_value=None)
        elif db_field.name in ("fallback_models", "skills"):
            kwargs.update(form_class=InheritedJSONField,
                          widget=forms.TextInput(attrs={"size": 22, "placeholder": '["…"] or empty: inherit'}))
        elif db_field.name == "model":
            kwargs["widget"] = forms.TextInput(attrs={"size": 22, "placeholder": "inherit"})
        elif db_field.name in ("weight", "temperature", "max_tokens"):
            kwargs["widget"] = forms.NumberInput(attrs={"style": "width: 6em"})
        return super().formfield_for_dbfield(db_field, request, **kwargs)


class ExperimentForm(forms.ModelForm):
    class Meta:
        model = Experiment
        fields = "__all__"

    def clean(self) -> dict:
        data = super().clean()
        if data.get("mode") == Experiment.Mode.CANARY and data.get("canary_steps"):
            steps = data["canary_steps"]
            if not isinstance(steps, list) or any(not isinstance(s, int) or not 1 <= s <= 100 for s in steps) \
                    or any(b <= a for a, b in zip(steps, steps[1:])):
                self.add_error("canary_steps", "Ascending percentages in 1..100, e.g. [5, 25, 50, 100].")
        return data


def _run_status_change(modeladmin, request: HttpRequest, queryset: QuerySet, status: str, verb: str) -> None:
    done = 0
    for experiment in queryset:
        try:
            experiment_update(experiment_id=experiment.id, fields={"status": status}, actor=user_actor(request.user))
            done += 1
        except PlatformError as exc:
            modeladmin.message_user(request, f"{experiment.name}: {exc.message}", messages.ERROR)
    if done:
        modeladmin.message_user(request, f"{verb} {done} experiment(s).", messages.SUCCESS)


@admin.register(Experiment)
class ExperimentAdmin(admin.ModelAdmin):
    form = ExperimentForm
    inlines = [VariantInline]
    list_display = ["name", "agent", "status", "mode", "split", "started_at", "ended_at", "results_link"]
    list_filter = ["status", "mode", "agent"]
    search_fields = ["name", "agent__name"]
    list_select_related = ["agent"]
    readonly_fields = ["status", "started_at", "ended_at", "canary_state", "canary_step", "canary_next_at",
                       "canary_step_started_at", "promoted_variant", "created_at", "updated_at", "results_link"]
    fieldsets = [
        (None, {"fields": ["name", "agent", "description", "status", "mode", "flag", "min_sample", "results_link"]}),
        ("Canary rollout", {"classes": ["collapse"], "fields": [
            "canary_steps", "canary_interval_minutes", "canary_max_error_rate_delta", "canary_max_p95_ratio",
            "canary_min_sample", "canary_state", "canary_step", "canary_next_at", "canary_step_started_at"]}),
        ("Shadow traffic", {"classes": ["collapse"], "fields": ["shadow_variant", "shadow_percent"]}),
        ("History", {"fields": ["started_at", "ended_at", "promoted_variant", "created_at", "updated_at"]}),
    ]
    actions = ["start_selected", "pause_selected", "finish_selected"]

    def get_queryset(self, request: HttpRequest) -> QuerySet:
        return super().get_queryset(request).prefetch_related("variants")

    def formfield_for_foreignkey(self, db_field, request, **kwargs):
        if db_field.name == "shadow_variant":
            object_id = request.resolver_match.kwargs.get("object_id") if request.resolver_match else None
            kwargs["queryset"] = Variant.objects.filter(experiment_id=object_id, is_control=False) if object_id \
                else Variant.objects.none()
        return super().formfield_for_foreignkey(db_field, request, **kwargs)

    @admin.display(description="Split")
    def split(self, obj: Experiment) -> str:
        return " / ".join(f"{v.name} {v.weight}%" for v in obj.variants.all())

    @admin.display(description="Results")
    def results_link(self, obj: Experiment) -> str:
        if not obj.pk:
            return "—"
        return format_html('<a href="{}">Results</a>', reverse("admin:experiments_experiment_results", args=[obj.pk]))

    def save_related(self, request: HttpRequest, form, formsets, change: bool) -> None:
        super().save_related(request, form, formsets, change)
        # In the admin's transaction: the change and its audit entry commit together.
        experiment_audit_saved(experiment=form.instance, created=not change, actor=user_actor(request.user),
                               request_id=getattr(request, "request_id", "") or "")
        form.instance.save(update_fields=["updated_at"])  # drops the cached running experiment

    def delete_model(self, request: HttpRequest, obj: Experiment) -> None:
        experiment_audit_deleted(experiment=obj, actor=user_actor(request.user))
        super().delete_model(request, obj)

    def delete_queryset(self, request: HttpRequest, queryset: QuerySet) -> None:
        for experiment in queryset.select_related("agent"):
            experiment_audit_deleted(experiment=experiment, actor=user_actor(request.user))
        super().delete_queryset(request, queryset)

    @admin.action(description="Start or resume selected experiments", permissions=["change"])
    def start_selected(self, request: HttpRequest, queryset: QuerySet) -> None:
        _run_status_change(self, request, queryset, Experiment.Status.RUNNING, "Started")

    @admin.action(description="Pause selected experiments", permissions=["change"])
    def pause_selected(self, request: HttpRequest, queryset: QuerySet) -> None:
        _run_status_change(self, request, queryset, Experiment.Status.PAUSED, "Paused")

    @admin.action(description="Finish selected experiments", permissions=["change"])
    def finish_selected(self, request: HttpRequest, queryset: QuerySet) -> None:
        _run_status_change(self, request, queryset, Experiment.Status.FINISHED, "Finished")

    # --- the results page ---------------------------------------------------------------

    def get_urls(self):
        @http_methods("GET", "POST")
        def results(request: HttpRequest, experiment_id: int) -> HttpResponse:
            return self.results_view(request, experiment_id)

        view = self.admin_site.admin_view(page_csp(results))
        return [path("<int:experiment_id>/results/", view, name="experiments_experiment_results"),
                *super().get_urls()]

    def results_view(self, request: HttpRequest, experiment_id: int) -> HttpResponse:
        if not self.has_view_permission(request):
            raise PermissionDenied
        experiment = get_object_or_404(Experiment.objects.select_related("agent"), pk=experiment_id)
        if request.method == "POST":
            return self._results_action(request, experiment)
        results = experiment_results(experiment)
        shadows = list(ShadowRun.objects.filter(experiment=experiment).order_by("-created_at", "-id")[:SIDE_BY_SIDE])
        live = {m.run_id: m.content for m in Message.objects.filter(
            run_id__in=[s.live_run_id for s in shadows], role=Message.Role.ASSISTANT).order_by("created_at", "id")}
        charts = {"labels": [v["name"] for v in results["variants"]],
                  "error_rate": [v["error_rate"] for v in results["variants"]],
                  "latency_p50_ms": [v["latency_p50_ms"] for v in results["variants"]],
                  "latency_p95_ms": [v["latency_p95_ms"] for v in results["variants"]],
                  "cost_per_request_usd": [v["cost_per_request_usd"] for v in results["variants"]],
                  "positive_rate": [v["positive_rate"] for v in results["variants"]]}
        context = {**self.admin_site.each_context(request), "opts": self.model._meta, "title": f"Results: {experiment.name}",
                   "experiment": experiment, "results": results, "charts": charts,
                   "shadows": [{"row": s, "live": live.get(s.live_run_id, "")} for s in shadows],
                   "can_change": self.has_change_permission(request, experiment)
                   and experiment.status != Experiment.Status.FINISHED}
        return TemplateResponse(request, "admin/experiments/results.html", context)

    def _results_action(self, request: HttpRequest, experiment: Experiment) -> HttpResponse:
        if not self.has_change_permission(request, experiment):
            raise PermissionDenied
        action = request.POST.get("action", "")
        try:
            if action == "promote":
                variant = request.POST.get("variant", "")
                experiment_promote(experiment_id=experiment.id, variant_name=variant, actor=user_actor(request.user))
                self.message_user(request, f"Promoted {variant!r}: the agent {experiment.agent.name!r} now runs "
                                           "its configuration, and the experiment is finished.", messages.SUCCESS)
            elif action in ("pause", "resume", "finish"):
                status = {"pause": Experiment.Status.PAUSED, "resume": Experiment.Status.RUNNING,
                          "finish": Experiment.Status.FINISHED}[action]
                experiment_update(experiment_id=experiment.id, fields={"status": status},
                                  actor=user_actor(request.user))
                self.message_user(request, f"Experiment {experiment.name!r} is now {status}.", messages.SUCCESS)
            else:
                self.message_user(request, "Unknown action.", messages.ERROR)
        except PlatformError as exc:
            self.message_user(request, exc.message, messages.ERROR)
        return HttpResponseRedirect(reverse("admin:experiments_experiment_results", args=[experiment.pk]))


@admin.register(ShadowRun)
class ShadowRunAdmin(admin.ModelAdmin):
    """Read-only: written by the shadow traffic (experiments.shadow)."""

    list_display = ["created_at", "experiment", "variant", "status", "model", "latency_ms", "cost_usd", "live_run"]
    list_filter = ["status", "experiment"]
    list_select_related = ["experiment"]
    raw_id_fields = ["live_run", "experiment"]
    show_full_result_count = False

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

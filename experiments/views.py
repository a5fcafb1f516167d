"""Experiments over REST (admin keys), in the shape of the other admin endpoints:

    POST  /api/v1/admin/experiments              {name, agent, status?: draft|running, mode?: ab|canary,
                                                  variants: [{name, weight, is_control?, model?,
                                                  fallback_models?, system_prompt?, temperature?, max_tokens?,
                                                  skills?}], description?, flag?, min_sample?, shadow_variant?,
                                                  shadow_percent?, canary_*?}  → 201 with the experiment
    GET   /api/v1/admin/experiments              (?agent=&status=&limit=&offset=) newest first
    GET   /api/v1/admin/experiments/{id}         one experiment with its variants
    PATCH /api/v1/admin/experiments/{id}         any of the above but agent; `status` moves it
                                                 (running, paused, finished); `promote: "<variant>"`
                                                 applies that variant to the agent and finishes it
    GET   /api/v1/admin/experiments/{id}/results figures per variant, comparisons with p_value

Validate at the edge (StrictSerializer: unknown fields are a 400 naming them), then one
service call (experiments.services), audited with the key as actor.
"""

from __future__ import annotations

from django.db import transaction
from drf_spectacular.utils import OpenApiParameter, OpenApiResponse, extend_schema
from rest_framework import generics, serializers, status
from rest_framework.request import Request
from rest_framework.response import Response

from agentplatform.asyncviews import client_ip
from agentplatform.errors import NotFound, request_id_of
from agentplatform.serializers import StrictSerializer
from agents.models import MODEL_RE, NAME_RE
from governance.permissions import IsAdminKey

from .models import Experiment
from .results import experiment_results
from .services import experiment_create, experiment_promote, experiment_update

ERRORS = {
    400: OpenApiResponse(description="Invalid body: `error.param` names the field (e.g. weights not summing to "
                                     "100: `weights_not_100`; another experiment running on the agent: "
                                     "`experiment_already_running`)."),
    401: OpenApiResponse(description="Missing or invalid API key."),
    403: OpenApiResponse(description="The key is not an admin key."),
    404: OpenApiResponse(description="No experiment with this id, or no agent with this name."),
}


class VariantSerializer(StrictSerializer):
    name = serializers.RegexField(NAME_RE, max_length=64)
    weight = serializers.IntegerField(min_value=0, max_value=100)
    is_control = serializers.BooleanField(default=False)
    model = serializers.RegexField(MODEL_RE, max_length=200, required=False, allow_blank=True)
    fallback_models = serializers.ListField(child=serializers.RegexField(MODEL_RE, max_length=200), max_length=10,
                                            required=False, allow_null=True)
    system_prompt = serializers.CharField(required=False, allow_null=True, allow_blank=True, max_length=100_000,
                                          trim_whitespace=False)
    temperature = serializers.FloatField(min_value=0.0, max_value=2.0, required=False, allow_null=True)
    max_tokens = serializers.IntegerField(min_value=1, max_value=200_000, required=False, allow_null=True)
    skills = serializers.ListField(child=serializers.CharField(max_length=64), max_length=50, required=False,
                                   allow_null=True)


class ExperimentCreateSerializer(StrictSerializer):
    name = serializers.RegexField(NAME_RE, max_length=100)
    agent = serializers.CharField(max_length=64)
    description = serializers.CharField(required=False, allow_blank=True, max_length=10_000)
    status = serializers.ChoiceField(choices=[Experiment.Status.DRAFT, Experiment.Status.RUNNING],
                                     default=Experiment.Status.DRAFT)
    mode = serializers.ChoiceField(choices=Experiment.Mode.values, default=Experiment.Mode.AB)
    flag = serializers.CharField(required=False, allow_blank=True, max_length=100)
    min_sample = serializers.IntegerField(min_value=2, max_value=10_000_000, required=False)
    variants = VariantSerializer(many=True)
    shadow_variant = serializers.CharField(required=False, allow_blank=True, max_length=64)
    shadow_percent = serializers.IntegerField(min_value=0, max_value=100, required=False)
    canary_steps = serializers.ListField(child=serializers.IntegerField(min_value=1, max_value=100),
                                        max_length=20, required=False)
    canary_interval_minutes = serializers.IntegerField(min_value=1, max_value=60 * 24 * 30, required=False)
    canary_max_error_rate_delta = serializers.FloatField(min_value=0.0, max_value=1.0, required=False)
    canary_max_p95_ratio = serializers.FloatField(min_value=1.0, max_value=1000.0, required=False)
    canary_min_sample = serializers.IntegerField(min_value=1, max_value=10_000_000, required=False)


class ExperimentUpdateSerializer(ExperimentCreateSerializer):
    agent = None
    name = serializers.RegexField(NAME_RE, max_length=100, required=False)
    status = serializers.ChoiceField(choices=Experiment.Status.values, required=False)
    mode = serializers.ChoiceField(choices=Experiment.Mode.values, required=False)
    variants = VariantSerializer(many=True, required=False)
    promote = serializers.CharField(required=False, max_length=64,
                                    help_text="A variant's name: apply it to the agent and finish the experiment.")

    def to_internal_value(self, data):
        if isinstance(data, dict) and "agent" in data:
            raise serializers.ValidationError({"agent": ["An experiment's agent cannot be changed; create another "
                                                         "experiment instead."]})
        return super().to_internal_value(data)


class ExperimentFilterSerializer(serializers.Serializer):
    agent = serializers.CharField(required=False, max_length=64)
    status = serializers.ChoiceField(choices=Experiment.Status.values, required=False)


def variant_payload(variant) -> dict:
    return {"name": variant.name, "weight": variant.weight, "is_control": variant.is_control,
            "model": variant.model or None, "fallback_models": variant.fallback_models,
            "system_prompt": variant.system_prompt, "temperature": variant.temperature,
            "max_tokens": variant.max_tokens, "skills": variant.skills}


def experiment_payload(experiment: Experiment) -> dict:
    variants = list(experiment.variants.all())
    shadow = next((v.name for v in variants if v.id == experiment.shadow_variant_id), None)
    data = {"id": experiment.id, "object": "experiment", "name": experiment.name, "agent": experiment.agent.name,
            "description": experiment.description, "status": experiment.status, "mode": experiment.mode,
            "flag": experiment.flag or None, "min_sample": experiment.min_sample,
            "started_at": experiment.started_at.isoformat() if experiment.started_at else None,
            "ended_at": experiment.ended_at.isoformat() if experiment.ended_at else None,
            "variants": [variant_payload(v) for v in variants],
            "shadow_variant": shadow, "shadow_percent": experiment.shadow_percent,
            "promoted_variant": experiment.promoted_variant or None,
            "created_at": experiment.created_at.isoformat(), "updated_at": experiment.updated_at.isoformat()}
    if experiment.mode == Experiment.Mode.CANARY:
        data["canary"] = {"state": experiment.canary_state or None, "steps": experiment.canary_steps,
                          "step": experiment.canary_step,
                          "next_at": experiment.canary_next_at.isoformat() if experiment.canary_next_at else None,
                          "interval_minutes": experiment.canary_interval_minutes,
                          "max_error_rate_delta": experiment.canary_max_error_rate_delta,
                          "max_p95_ratio": experiment.canary_max_p95_ratio,
                          "min_sample": experiment.canary_min_sample}
    return data


def _experiments():
    return Experiment.objects.select_related("agent").prefetch_related("variants")


def _experiment_or_404(experiment_id: int) -> Experiment:
    experiment = _experiments().filter(pk=experiment_id).first()
    if experiment is None:
        raise NotFound(f"No experiment with id {experiment_id}.", code="experiment_not_found", param="id")
    return experiment


def _audit_context(request: Request) -> dict:
    return {"actor": request.user.actor, "request_id": request_id_of(request) or "",
            "client_ip": client_ip(request._request)}


class AdminExperimentListView(generics.GenericAPIView):
    permission_classes = [IsAdminKey]
    serializer_class = ExperimentCreateSerializer
    queryset = Experiment.objects.none()

    @extend_schema(operation_id="api_v1_admin_experiments_list",
                   parameters=[OpenApiParameter("agent", str, description="Agent name."),
                               OpenApiParameter("status", str, enum=Experiment.Status.values)],
                   responses={200: OpenApiResponse(description="Experiments, newest first."), **ERRORS})
    def get(self, request: Request) -> Response:
        filters = ExperimentFilterSerializer(data=request.query_params.dict())
        filters.is_valid(raise_exception=True)
        queryset = _experiments().order_by("-created_at", "-id")
        if "agent" in filters.validated_data:
            queryset = queryset.filter(agent__name=filters.validated_data["agent"])
        if "status" in filters.validated_data:
            queryset = queryset.filter(status=filters.validated_data["status"])
        page = self.paginate_queryset(queryset)
        return self.get_paginated_response([experiment_payload(e) for e in page])

    @extend_schema(request=ExperimentCreateSerializer,
                   responses={201: OpenApiResponse(description="The experiment."), **ERRORS})
    def post(self, request: Request) -> Response:
        serializer = ExperimentCreateSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        data = dict(serializer.validated_data)
        variants = [dict(v) for v in data.pop("variants")]
        experiment = experiment_create(agent_name=data.pop("agent"), variants=variants,
                                       status=data.pop("status"), shadow_variant=data.pop("shadow_variant", None),
                                       **data, **_audit_context(request))
        return Response(experiment_payload(_experiment_or_404(experiment.id)), status=status.HTTP_201_CREATED)


class AdminExperimentDetailView(generics.GenericAPIView):
    permission_classes = [IsAdminKey]
    serializer_class = ExperimentUpdateSerializer
    queryset = Experiment.objects.none()

    @extend_schema(responses={200: OpenApiResponse(description="The experiment."), **ERRORS})
    def get(self, request: Request, experiment_id: int) -> Response:
        return Response(experiment_payload(_experiment_or_404(experiment_id)))

    @extend_schema(request=ExperimentUpdateSerializer,
                   responses={200: OpenApiResponse(description="The experiment."), **ERRORS},
                   description="Takes effect on the next request on every worker. `status`: running, paused or "
                               "finished; `variants` (replaced whole) while draft or paused; `promote` applies a "
                               "variant's overrides to the agent and finishes the experiment (audited).")
    def patch(self, request: Request, experiment_id: int) -> Response:
        _experiment_or_404(experiment_id)
        serializer = ExperimentUpdateSerializer(data=request.data, partial=True)
        serializer.is_valid(raise_exception=True)
        fields = dict(serializer.validated_data)
        promote = fields.pop("promote", None)
        if "variants" in fields:
            fields["variants"] = [dict(v) for v in fields["variants"]]
        with transaction.atomic():  # both or neither
            if fields:
                experiment_update(experiment_id=experiment_id, fields=fields, **_audit_context(request))
            if promote is not None:
                experiment_promote(experiment_id=experiment_id, variant_name=promote, **_audit_context(request))
        return Response(experiment_payload(_experiment_or_404(experiment_id)))


class AdminExperimentResultsView(generics.GenericAPIView):
    permission_classes = [IsAdminKey]
    queryset = Experiment.objects.none()

    @extend_schema(responses={200: OpenApiResponse(description="Per variant: requests, error rate, latency "
                                                               "p50/p95, tokens and cost per request, feedback; "
                                                               "comparisons with the control, each with p_value, "
                                                               "CI and sequential_p_value."), **ERRORS})
    def get(self, request: Request, experiment_id: int) -> Response:
        return Response(experiment_results(_experiment_or_404(experiment_id)))

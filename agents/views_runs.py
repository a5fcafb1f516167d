"""REST API of async runs (agents.runs): queue, list, read, cancel.

    POST /api/v1/agents/{name}/runs   202 {id, status: "queued", ...}; Idempotency-Key applies
    GET  /api/v1/runs                 the caller's runs (an admin key: all), newest first
    GET  /api/v1/runs/{id}            one of them; another key's run is a 404
    POST /api/v1/runs/{id}/cancel     queued: cancelled at once; running: its worker stops it
    POST /api/v1/runs/{id}/feedback   {rating: 1|-1, comment?}: a rating of the answer (any transport's run)

Queueing is async like chat (the key and agent from the cache, the callback URL's host resolved
off the loop); the reads and the cancel are plain DRF views.
"""

from __future__ import annotations

import uuid

from django.http import JsonResponse
from drf_spectacular.utils import OpenApiParameter, OpenApiResponse, extend_schema
from rest_framework import generics, serializers
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from agentplatform.asyncviews import AsyncAPIView, client_ip, parse_json_body, require_principal
from agentplatform.db import run_db
from agentplatform.errors import NotFound
from agentplatform.serializers import StrictSerializer
from governance.idempotency import idempotent
from governance.permissions import owned_by_key
from governance.selectors import presented_key

from .chat_input import async_run_input
from .models import Run
from .pipeline import authorize_agent, principal_and_agent
from .runs import async_run_create, callback_url_check, run_cancel, run_payload
from .selectors import runs_with_usage
from .services import FEEDBACK_COMMENT_MAX_CHARS, run_feedback_set
from .serializers import RunCreateRequestSerializer, RunQuerySerializer, RunSerializer

RUN_ERRORS = {
    401: OpenApiResponse(description="Missing or invalid API key."),
    404: OpenApiResponse(description="No such run of this key (`run_not_found`)."),
}


def _runs_of(principal):
    return owned_by_key(Run.objects.select_related("agent"), principal)


def _run_or_404(principal, run_id: uuid.UUID) -> Run:
    run = runs_with_usage(_runs_of(principal)).filter(pk=run_id).first()
    if run is None:
        raise NotFound("No such run.", code="run_not_found")
    return run


class RunCreateView(AsyncAPIView):
    """Queue a run of the agent: executed by a worker through the same pipeline as chat."""

    @extend_schema(
        request=RunCreateRequestSerializer,
        responses={202: RunSerializer,
                   400: OpenApiResponse(description="Invalid body (`error.param` names the field), or a "
                                                    "`callback_url` that is not at a public address."),
                   401: RUN_ERRORS[401],
                   404: OpenApiResponse(description="Unknown or disabled agent, or a session of someone else.")},
        description="The body of chat without `stream`, plus `callback_url`. Answers 202 with the queued run "
                    "(`Location: /api/v1/runs/{id}`); poll it, or receive it at `callback_url` once it ended. "
                    "Rate limits, budgets and guards apply when the run executes: a refusal ends it `failed` "
                    "with that error's code.",
    )
    async def post(self, request, name: str):
        principal, agent = await principal_and_agent(presented_key(request.headers), name)
        require_principal(principal)
        agent = authorize_agent(principal, agent, name)
        return await idempotent(request, principal, lambda: self._create(request, principal, agent))

    async def _create(self, request, principal, agent):
        data = async_run_input(parse_json_body(request))
        if data.callback_url:
            await callback_url_check(data.callback_url)
        run = await run_db(lambda: _created(principal, agent, data, request.request_id, client_ip(request)))
        response = JsonResponse(run_payload(run), status=202)
        response["Location"] = f"/api/v1/runs/{run.id}"
        return response


def _created(principal, agent, data, request_id, ip) -> Run:
    run = async_run_create(principal=principal, agent=agent, data=data, request_id=request_id or "", client_ip=ip)
    return runs_with_usage(Run.objects.select_related("agent")).get(pk=run.pk)


class RunListView(generics.GenericAPIView):
    serializer_class = RunSerializer
    queryset = Run.objects.none()

    @extend_schema(parameters=[
        OpenApiParameter("agent", str, description="Only this agent's runs."),
        OpenApiParameter("status", str, enum=Run.Status.values),
        OpenApiParameter("transport", str, enum=Run.Transport.values),
        OpenApiParameter("session_id", str, description="Only this session's runs (a UUID)."),
        OpenApiParameter("from", str, description="ISO date or datetime: started (or queued) at or after."),
        OpenApiParameter("to", str, description="ISO date (included) or datetime (excluded)."),
    ], responses={200: RunSerializer(many=True)})
    def get(self, request: Request) -> Response:
        query = RunQuerySerializer(data=request.query_params)
        query.is_valid(raise_exception=True)
        q = query.validated_data
        runs = _runs_of(request.user).order_by("-started_at", "-id")
        if q.get("agent"):
            runs = runs.filter(agent__name=q["agent"])
        for name in ("status", "transport", "session_id"):
            if q.get(name):
                runs = runs.filter(**{name: q[name]})
        if q.get("from"):
            runs = runs.filter(started_at__gte=q["from"])
        if q.get("to"):
            runs = runs.filter(started_at__lt=q["to"])
        page = self.paginate_queryset(runs)
        # The page's usage in a second query: aggregating before paginating would make the count
        # of a key with many runs join every usage record.
        billed = runs_with_usage(Run.objects.select_related("agent")).in_bulk([run.pk for run in page])
        return self.get_paginated_response([run_payload(billed[run.pk]) for run in page])


class RunDetailView(APIView):
    @extend_schema(responses={200: RunSerializer, **RUN_ERRORS})
    def get(self, request: Request, run_id: uuid.UUID) -> Response:
        return Response(run_payload(_run_or_404(request.user, run_id)))


class RunCancelView(APIView):
    @extend_schema(request=None, responses={200: RunSerializer, **RUN_ERRORS,
                                            409: OpenApiResponse(description="The run ended, or is not an async "
                                                                             "run (`run_not_cancellable`).")},
                   description="A queued run is cancelled at once; a running one is asked to stop "
                               "(`cancel_requested: true`, status `running` until its worker stops it, within "
                               "RUN_CANCEL_POLL_SECONDS). Cancelling a cancelled run changes nothing.")
    def post(self, request: Request, run_id: uuid.UUID) -> Response:
        run_cancel(run_id=run_id, principal=request.user, request_id=getattr(request, "request_id", "") or "",
                   client_ip=client_ip(request))
        return Response(run_payload(_run_or_404(request.user, run_id)))


class RunFeedbackSerializer(StrictSerializer):
    rating = serializers.IntegerField(help_text="1 (thumbs up) or -1 (thumbs down).")
    comment = serializers.CharField(required=False, allow_blank=True, max_length=FEEDBACK_COMMENT_MAX_CHARS)

    def validate_rating(self, value: int) -> int:
        # Exactly the JSON numbers 1 and -1 (DRF's IntegerField would take "1", 1.0 or true).
        if type(self.initial_data.get("rating")) is not int or value not in (1, -1):
            raise serializers.ValidationError("Must be 1 (thumbs up) or -1 (thumbs down).")
        return value


class RunFeedbackView(APIView):
    @extend_schema(request=RunFeedbackSerializer,
                   responses={200: OpenApiResponse(description="{run_id, rating, comment, feedback_at, variant}"),
                              400: OpenApiResponse(description="`rating` is not 1 or -1, or an unknown field."),
                              **RUN_ERRORS},
                   description="Rate an answer: the caller's own runs (an admin key: any run), once finished. "
                               "Rating again replaces the rating. Experiments count it per variant; the chat "
                               "console's thumbs record the same way.")
    def post(self, request: Request, run_id: uuid.UUID) -> Response:
        serializer = RunFeedbackSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        data = serializer.validated_data
        run = run_feedback_set(run_id=run_id, value=data["rating"], comment=data.get("comment"),
                               principal=request.user, request_id=getattr(request, "request_id", "") or "",
                               client_ip=client_ip(request))
        return Response({"run_id": str(run.id), "rating": run.feedback, "comment": run.feedback_comment,
                         "feedback_at": run.feedback_at, "variant": run.variant or None})

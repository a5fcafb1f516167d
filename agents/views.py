"""REST API of the agents app: agents, sessions, chat (JSON or SSE).

The chat view is async end to end (AsyncAPIView); the listing views are plain DRF views —
they are not the hot path and run the ORM as DRF does.

Agents are written (POST /api/v1/agents, PATCH and DELETE /api/v1/agents/{name}) by developer
and admin keys only, through agents_load: the API accepts exactly what an agents file accepts,
with the same validation and "only the keys given change" on update. A key restricted to some
agents may change those and may not create new ones.
"""

from __future__ import annotations

import re

from django.db import transaction
from django.db.models import Count, Q
from django.http import JsonResponse
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiParameter, OpenApiResponse, extend_schema
from rest_framework import generics, status
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from agentplatform.asyncviews import AsyncAPIView, client_ip, parse_json_body, require_principal, with_headers
from agentplatform.circuit import OPEN, circuit_states
from agentplatform.errors import Conflict, InvalidRequest, NotFound, PermissionDenied
from governance.audit import audit_actor
from governance.idempotency import idempotent
from governance.models import ApiKey
from governance.permissions import ReadOnlyForClients, owned_by_key
from governance.selectors import presented_key

from . import services
from .chat_input import rest_chat_input
from .loading import DefinitionsInvalid, agents_load
from .models import Agent, Session
from .pipeline import ChatTurn, authorize_agent, chat_complete, principal_and_agent
from .providers import provider_for
from .providers.base import ProviderError
from .selectors import agent_spec, agent_spec_from_model, visible_agents
from .serializers import (
    AgentDetailSerializer,
    AgentSerializer,
    ChatRequestSerializer,
    ChatResponseSerializer,
    SessionCreateSerializer,
    SessionDetailSerializer,
    SessionSerializer,
)
from .streaming import sse_stream, stream_response

ERRORS = {
    400: OpenApiResponse(description="Invalid body: `error.param` names the field."),
    401: OpenApiResponse(description="Missing or invalid API key."),
    404: OpenApiResponse(description="Unknown or disabled agent, or a session of someone else."),
}
WRITE_ERRORS = {
    400: OpenApiResponse(description="Invalid definition: `error.param` names the first bad field, "
                                     "`error.details` lists every problem."),
    401: ERRORS[401],
    403: OpenApiResponse(description="A client key, or a key restricted to other agents."),
    404: OpenApiResponse(description="No agent with this name."),
}


def _agent_payload(agent, *, detail: bool = False) -> dict:
    data = {
        "name": agent.name, "description": agent.description, "model": agent.model,
        "fallback_models": list(agent.fallback_models), "temperature": agent.temperature,
        "max_tokens": agent.max_tokens, "timeout_seconds": agent.timeout_seconds, "max_retries": agent.max_retries,
        "skills": [{"name": s.name, "description": s.description, "kind": s.kind, "parameters": s.parameters}
                   for s in agent.skills],
    }
    if detail:
        data["system_prompt"] = agent.system_prompt
        data["metadata"] = agent.metadata
    return data


# The loader labels each problem with the entry's position ("agents[0] (name 'x'): model: ..."),
# which means nothing for a one-agent body; what follows starts with the field, if any.
_FIELD_RE = re.compile(r"^(?:unknown key '(?P<unknown>[^']+)'|(?P<field>[A-Za-z_]+)(?:\[\d+\])?:)")


def _load_one(definition: dict, *, overwrite: bool):
    """agents_load for one agent; its DefinitionsInvalid becomes a 400 naming the first bad field."""
    name = definition.get("name")
    label = f"agents[0] (name {name!r}): " if isinstance(name, str) else "agents[0]: "
    try:
        return agents_load(definitions={"agents": [definition]}, overwrite=overwrite)
    except DefinitionsInvalid as exc:
        errors = [e[len(label):] if e.startswith(label) else e for e in exc.errors]
        match = _FIELD_RE.match(errors[0]) if errors else None
        param = (match.group("unknown") or match.group("field")) if match else None
        raise InvalidRequest(errors[0] if errors else exc.message, code="invalid_agent", param=param,
                             details=errors) from None


def _definition(request: Request) -> dict:
    if not isinstance(request.data, dict):
        raise InvalidRequest("The body must be a JSON object: one agent definition.", code="invalid_agent")
    definition = dict(request.data)
    # A key limited to some skills may not hand other skills to an agent (which every key that
    # may call the agent would then get offered, this one included).
    skills = definition.get("skills")
    allowed = request.user.skills
    if allowed is not None and isinstance(skills, list):
        beyond = sorted({s for s in skills if isinstance(s, str) and s not in allowed})
        if beyond:
            raise PermissionDenied(f"This API key may not give agents the skills: {', '.join(beyond)}.",
                                   code="skill_not_allowed", param="skills")
    return definition


def _may_change(request: Request, name: str) -> None:
    if not request.user.may_use_agent(name):
        raise PermissionDenied(f"This API key may not change the agent {name!r}.", code="agent_not_allowed")


def _written_agent(name: str) -> dict:
    spec = agent_spec(name)
    assert spec is not None  # just written in this request
    return _agent_payload(spec, detail=True)


class AgentListView(generics.GenericAPIView):
    """Agents the caller's key may use; developer and admin keys create agents here."""

    permission_classes = [ReadOnlyForClients]
    serializer_class = AgentSerializer
    queryset = Agent.objects.none()

    @extend_schema(parameters=[OpenApiParameter("q", str, description="Filter by name or description.")],
                   responses={200: AgentSerializer(many=True)})
    def get(self, request: Request) -> Response:
        queryset = visible_agents(request.user).order_by("name")
        q = request.query_params.get("q")
        if q:
            queryset = queryset.filter(Q(name__icontains=q) | Q(description__icontains=q))
        page = self.paginate_queryset(queryset)
        return self.get_paginated_response([_agent_payload(agent_spec_from_model(a)) for a in page])

    @extend_schema(request=OpenApiTypes.OBJECT,
                   responses={201: AgentDetailSerializer, **WRITE_ERRORS,
                              409: OpenApiResponse(description="An agent with this name exists (maybe disabled).")},
                   description="Developer or admin key not restricted to some agents. The body is one agent "
                               "definition as in an agents file: `name`, `model` (required), `description`, "
                               "`system_prompt`, `temperature`, `max_tokens`, `timeout_seconds`, `max_retries`, "
                               "`enabled`, `metadata`, `skills` (names), `fallback_models`.")
    def post(self, request: Request) -> Response:
        if request.user.agents is not None:
            raise PermissionDenied("An API key restricted to some agents may not create agents.",
                                   code="agent_not_allowed")
        definition = _definition(request)
        name = definition.get("name")
        conflict = Conflict(f"An agent named {name!r} exists already.", code="agent_exists", param="name")
        if isinstance(name, str) and Agent.objects.filter(name=name).exists():
            raise conflict
        with audit_actor(request.user.actor), transaction.atomic():
            # overwrite=False: an agent created by someone else since the check above is kept, not replaced.
            if name in _load_one(definition, overwrite=False).agents_kept:
                raise conflict
        return Response(_written_agent(name), status=status.HTTP_201_CREATED)


def _visible_agent(request: Request, name: str):
    return authorize_agent(request.user, agent_spec(name), name)


class AgentDetailView(APIView):
    permission_classes = [ReadOnlyForClients]

    def _writable(self, request: Request, name: str) -> Agent:
        """The agent, enabled or not, locked for the change; 403 or 404 otherwise."""
        _may_change(request, name)
        agent = Agent.objects.select_for_update().filter(name=name).first()
        if agent is None:
            raise NotFound(f"No agent named {name!r}.", code="agent_not_found", param="agent")
        return agent

    @extend_schema(responses={200: AgentDetailSerializer, 404: ERRORS[404]},
                   description="The system prompt and metadata are shown to developer and admin keys only.")
    def get(self, request: Request, name: str) -> Response:
        detail = request.user.role in (ApiKey.Role.ADMIN, ApiKey.Role.DEVELOPER)
        return Response(_agent_payload(_visible_agent(request, name), detail=detail))

    @extend_schema(request=OpenApiTypes.OBJECT, responses={200: AgentDetailSerializer, **WRITE_ERRORS},
                   description="Developer or admin key. Only the fields given change (as in an agents file); "
                               "`skills` replaces the list. A disabled agent can be changed (and re-enabled "
                               "with `enabled: true`). `name` may be given only unchanged: no renames.")
    def patch(self, request: Request, name: str) -> Response:
        with audit_actor(request.user.actor), transaction.atomic():
            agent = self._writable(request, name)
            definition = _definition(request)
            if definition.get("name", name) != name:
                raise InvalidRequest("Agents cannot be renamed: `name` must be the one in the URL, or left out.",
                                     code="rename_not_allowed", param="name")
            # The loader requires `model` in every entry; the current one changes nothing.
            _load_one({"model": agent.model, **definition, "name": name}, overwrite=True)
        return Response(_written_agent(name))

    @extend_schema(request=None, responses={204: None, **WRITE_ERRORS},
                   description="Developer or admin key. Disables the agent (its sessions and runs stay): it is "
                               "no longer listed or served. Disabling a disabled agent answers 204 too.")
    def delete(self, request: Request, name: str) -> Response:
        with audit_actor(request.user.actor), transaction.atomic():
            agent = self._writable(request, name)
            if agent.enabled:
                agent.enabled = False
                # A save, not update(): the cache-invalidation and audit signals must fire.
                agent.save(update_fields=["enabled", "updated_at"])
        return Response(status=status.HTTP_204_NO_CONTENT)


class AgentHealthView(AsyncAPIView):
    """Whether the agent can answer: its models' providers are configured, their circuits not
    open, and its skills enabled."""

    @extend_schema(responses={200: OpenApiTypes.OBJECT, 404: ERRORS[404]},
                   description="Per model: `available`, `detail` and its `circuit` {state: closed|open|half_open, "
                               "failures, retry_at}. `ok` when the primary model is available, `degraded` when "
                               "only a fallback is, `unavailable` (503) when none is.")
    async def get(self, request, name: str):
        principal, agent = await principal_and_agent(presented_key(request.headers), name)
        agent = authorize_agent(require_principal(principal), agent, name)
        names = [agent.model, *agent.fallback_models]
        models = []
        for model, circuit in zip(names, await circuit_states(names)):
            try:
                provider, _ = provider_for(model)
                configured = provider.name == "local" or bool(getattr(provider, "api_key", ""))
                detail = "ok" if configured else f"the {provider.name} provider has no API key configured"
            except ProviderError as exc:
                configured, detail = False, exc.message
            available = configured and circuit.state != OPEN
            if configured and not available:
                detail = f"failing: its circuit is open until {circuit.as_dict()['retry_at']}"
            models.append({"model": model, "available": available, "detail": detail, "circuit": circuit.as_dict()})
        primary_ok = models[0]["available"]
        any_ok = any(m["available"] for m in models)
        state = "ok" if primary_ok else ("degraded" if any_ok else "unavailable")
        return JsonResponse({"agent": agent.name, "status": state, "models": models,
                             "skills": [s.name for s in agent.skills]}, status=200 if any_ok else 503)


class ChatView(AsyncAPIView):
    """Send a message to an agent; JSON answer, or server-sent events with `"stream": true`."""

    @extend_schema(
        request=ChatRequestSerializer,
        responses={200: ChatResponseSerializer, **ERRORS,
                   502: OpenApiResponse(description="Every model of the agent failed."),
                   503: OpenApiResponse(description="The model provider is rate limiting us (`Retry-After`)."),
                   504: OpenApiResponse(description="The model did not answer in time.")},
        description="With `stream: true` the answer is `text/event-stream`: events `start`, `delta`, `tool_call`, "
                    "`tool_result`, `usage`, then `done` (or `error`, with `status` and `retry_after`), each "
                    "with a JSON `data:` line holding `type`; comment heartbeats every SSE_HEARTBEAT_SECONDS. "
                    "The stream starts once the model answered: a turn that failed before (every model failed) "
                    "is answered with its JSON error and status, as without `stream`.",
    )
    async def post(self, request, name: str):
        key = presented_key(request.headers)
        principal, agent = await principal_and_agent(key, name)
        require_principal(principal)
        agent = authorize_agent(principal, agent, name)
        return await idempotent(request, principal, lambda: self._chat(request, principal, agent))

    async def _chat(self, request, principal, agent):
        data = rest_chat_input(parse_json_body(request))
        turn = ChatTurn(principal=principal, agent=agent, input_messages=data.messages,
                        transport="sse" if data.stream else "rest", stream=data.stream,
                        request_id=request.request_id, session_id=data.session_id,
                        metadata=data.metadata, client_ip=client_ip(request))
        await turn.prepare()
        if not data.stream:
            return with_headers(JsonResponse(await chat_complete(turn)), turn.response_headers)
        return await stream_response(turn, sse_stream)


def _sessions_of(principal):
    return owned_by_key(Session.objects.select_related("agent").annotate(message_count=Count("messages")), principal)


class SessionListView(generics.GenericAPIView):
    serializer_class = SessionSerializer
    queryset = Session.objects.none()

    @extend_schema(parameters=[OpenApiParameter("agent", str, description="Only this agent's sessions.")],
                   responses={200: SessionSerializer(many=True)})
    def get(self, request: Request) -> Response:
        queryset = _sessions_of(request.user).order_by("-last_activity_at")
        agent = request.query_params.get("agent")
        if agent:
            queryset = queryset.filter(agent__name=agent)
        page = self.paginate_queryset(queryset)
        return self.get_paginated_response(SessionSerializer(page, many=True).data)

    @extend_schema(request=SessionCreateSerializer, responses={201: SessionSerializer, **ERRORS})
    def post(self, request: Request) -> Response:
        serializer = SessionCreateSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        data = serializer.validated_data
        agent = _visible_agent(request, data["agent"])
        session = services.session_create(agent_id=agent.id, principal=request.user, session_id=data.get("id"),
                                          title=data["title"], metadata=data["metadata"])
        session.message_count = 0
        return Response(SessionSerializer(session).data, status=status.HTTP_201_CREATED)


class SessionDetailView(APIView):
    def _get(self, request: Request, session_id) -> Session:
        session = _sessions_of(request.user).prefetch_related("messages").filter(pk=session_id).first()
        if session is None:
            raise NotFound("No such session.", code="session_not_found")
        return session

    @extend_schema(responses={200: SessionDetailSerializer, 404: ERRORS[404]})
    def get(self, request: Request, session_id) -> Response:
        return Response(SessionDetailSerializer(self._get(request, session_id)).data)

    @extend_schema(responses={204: None, 404: ERRORS[404]})
    def delete(self, request: Request, session_id) -> Response:
        services.session_delete(session=self._get(request, session_id))
        return Response(status=status.HTTP_204_NO_CONTENT)

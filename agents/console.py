"""The chat console: a page for staff signed in to the admin, and the JSON it reads.

The page (/console/, /console/<agent>/) chats over the WebSocket endpoint
(ws/agents/<name>/chat/, authenticated by the admin's session cookie); everything else it
needs comes from the small JSON API here, under /console/api/:

    GET  agents                      enabled agents
    GET  sessions?agent=&limit=&offset=   the signed-in user's sessions, newest first
    GET  sessions/<id>               one of them with its messages and per-run usage, cost, feedback
    POST feedback {run_id, value}    thumbs up (1), down (-1) or cleared (null) on an answer

Session authentication (CSRF enforced on POST), staff only; errors in the platform's one
JSON shape. These are the console's own endpoints, not part of the public API (API keys do
not work here and they are left out of the OpenAPI schema).
"""

from __future__ import annotations

import uuid

from django.contrib import admin, messages
from django.db.models import Count
from django.http import HttpRequest, HttpResponse
from django.middleware.csrf import get_token
from django.shortcuts import redirect, render
from django.urls import reverse
from drf_spectacular.utils import extend_schema
from rest_framework import exceptions as drf_exceptions
from rest_framework import generics
from rest_framework.authentication import SessionAuthentication
from rest_framework.permissions import BasePermission
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from agentplatform.asyncviews import client_ip
from agentplatform.csp import websocket_page_csp
from agentplatform.errors import AuthenticationFailed, InvalidRequest, NotFound, PermissionDenied
from agentplatform.methods import http_methods

from .models import Agent, Message, Run, Session
from .selectors import run_usage, runs_with_usage, usd_text
from .services import run_feedback_set

# A reopened session shows at most its latest this many messages.
SESSION_MESSAGES_LIMIT = 500
FEEDBACK_VALUES = (1, -1, None)


# --- the page -------------------------------------------------------------------------------


def _agent_payload(agent: Agent) -> dict:
    return {"name": agent.name, "description": agent.description, "model": agent.model,
            "skills": [s.name for s in agent.skills.all() if s.enabled]}


def enabled_agents() -> list[dict]:
    return [_agent_payload(a) for a in Agent.objects.filter(enabled=True).prefetch_related("skills").order_by("name")]


@http_methods("GET")
def _console_page(request: HttpRequest, agent: str | None = None) -> HttpResponse:
    agents = enabled_agents()
    if agent is not None and agent not in {a["name"] for a in agents}:
        messages.warning(request, f"There is no enabled agent named {agent!r}; pick one below.")
        return redirect("console")
    config = {
        "agents": agents,
        "agent": agent,
        "user": request.user.get_username(),
        "csrfToken": get_token(request),
        "consoleUrl": reverse("console"),
        "wsPath": "/ws/agents/{name}/chat/",
        "api": {"sessions": reverse("console-sessions"), "feedback": reverse("console-feedback")},
        "loginUrl": reverse("admin:login"),
    }
    context = {
        **admin.site.each_context(request),
        # The admin's app sidebar would squeeze the chat: the console has a sidebar of its own.
        "is_nav_sidebar_enabled": False,
        "title": "Chat console",
        "console_config": config,
    }
    return render(request, "console/chat.html", context)


# admin_view: staff only (others go to the admin's login page, with ?next=), never cached. The
# page's scripts are static files; they connect to this site and its WebSocket only.
console_page = admin.site.admin_view(websocket_page_csp(_console_page))


# --- the JSON endpoints ---------------------------------------------------------------------


class ConsoleSessionAuthentication(SessionAuthentication):
    """The admin's session; a failed CSRF check says so (DRF's PermissionDenied would be
    rendered as the API's generic "This API key may not do that")."""

    def enforce_csrf(self, request: HttpRequest) -> None:
        try:
            super().enforce_csrf(request)
        except drf_exceptions.PermissionDenied as exc:
            raise PermissionDenied(f"{exc.detail} Reload the console page and try again.",
                                   code="csrf_failed") from None


class IsStaff(BasePermission):
    def has_permission(self, request: Request, view: APIView) -> bool:
        user = request.user
        return bool(user and user.is_active and user.is_staff)


@extend_schema(exclude=True)
class ConsoleView(APIView):
    """Base of the console's endpoints: the admin's session, staff only, clear errors."""

    authentication_classes = [ConsoleSessionAuthentication]
    permission_classes = [IsStaff]

    def permission_denied(self, request: Request, message: str | None = None, code: str | None = None) -> None:
        if request.user is None:
            raise AuthenticationFailed("Sign in to the admin as a staff user to use the console.",
                                       code="not_authenticated")
        raise PermissionDenied("The console is for staff users only.", code="staff_only")


def _parse_uuid(value: object, param: str) -> uuid.UUID:
    try:
        return uuid.UUID(str(value))
    except (TypeError, ValueError, AttributeError):
        raise InvalidRequest(f"{param}: not a valid UUID.", code="invalid_field", param=param) from None


def _run_payload(run: Run) -> dict:
    return {"id": str(run.id), "status": run.status, "model": run.model, "transport": run.transport,
            "usage": run_usage(run), "cost_usd": usd_text(run.cost_usd), "latency_ms": run.latency_ms,
            "error": {"code": run.error_code, "message": run.error_message} if run.error_code else None,
            "feedback": run.feedback, "started_at": run.started_at}


def _session_payload(session: Session) -> dict:
    return {"id": str(session.id), "agent": session.agent.name, "title": session.title,
            "created_at": session.created_at, "last_activity_at": session.last_activity_at,
            "message_count": session.message_count}


def _message_payload(message: Message) -> dict:
    return {"id": message.id, "run_id": str(message.run_id) if message.run_id else None, "role": message.role,
            "content": message.content, "tool_calls": message.tool_calls, "tool_call_id": message.tool_call_id,
            "name": message.name, "created_at": message.created_at}


def _own_sessions(request: Request):
    # The console's sessions: those the WebSocket consumer started for this staff user.
    return Session.objects.filter(user=request.user).select_related("agent")


@extend_schema(exclude=True)
class AgentsView(ConsoleView):
    def get(self, request: Request) -> Response:
        return Response({"data": enabled_agents()})


@extend_schema(exclude=True)
class SessionsView(ConsoleView, generics.GenericAPIView):
    def get(self, request: Request) -> Response:
        sessions = _own_sessions(request).annotate(message_count=Count("messages")).order_by("-last_activity_at")
        agent = request.query_params.get("agent")
        if agent:
            sessions = sessions.filter(agent__name=agent)
        page = self.paginate_queryset(sessions)
        return self.get_paginated_response([_session_payload(s) for s in page])


@extend_schema(exclude=True)
class SessionDetailView(ConsoleView):
    def get(self, request: Request, session_id: uuid.UUID) -> Response:
        session = _own_sessions(request).annotate(message_count=Count("messages")).filter(pk=session_id).first()
        if session is None:
            raise NotFound("No such session of yours.", code="session_not_found")
        latest = list(session.messages.order_by("-created_at", "-id")[:SESSION_MESSAGES_LIMIT])
        latest.reverse()
        runs = runs_with_usage(session.runs.all()).order_by("started_at")
        return Response({**_session_payload(session), "truncated": session.message_count > len(latest),
                         "messages": [_message_payload(m) for m in latest],
                         "runs": [_run_payload(r) for r in runs]})


@extend_schema(exclude=True)
class FeedbackView(ConsoleView):
    def post(self, request: Request) -> Response:
        body = request.data
        if not isinstance(body, dict):
            raise InvalidRequest("The body must be a JSON object: {\"run_id\", \"value\"}.")
        unknown = sorted(set(body) - {"run_id", "value"})
        if unknown:
            raise InvalidRequest(f"{unknown[0]}: unknown field.", code="invalid_field", param=unknown[0])
        if "run_id" not in body:
            raise InvalidRequest("run_id: this field is required.", code="invalid_field", param="run_id")
        if "value" not in body:
            raise InvalidRequest("value: this field is required (1, -1 or null).", code="invalid_field",
                                 param="value")
        value = body["value"]
        # Exactly the JSON numbers 1 and -1 (true is an int in Python, 1.0 a float) or null.
        if not (value is None or (type(value) is int and value in FEEDBACK_VALUES)):
            raise InvalidRequest("value: must be 1 (thumbs up), -1 (thumbs down) or null (clear).",
                                 code="invalid_field", param="value")
        run = run_feedback_set(run_id=_parse_uuid(body["run_id"], "run_id"), user=request.user, value=value,
                               request_id=getattr(request, "request_id", "") or "", client_ip=client_ip(request))
        return Response({"run_id": str(run.id), "feedback": run.feedback, "feedback_at": run.feedback_at})

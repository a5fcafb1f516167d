"""Every HTTP route. The WebSocket routes are in asgi.py."""

from django.contrib import admin
from django.contrib.admin.views.decorators import staff_member_required
from django.urls import include, path
from drf_spectacular.views import SpectacularAPIView, SpectacularSwaggerView
from rest_framework.authentication import SessionAuthentication

from agents import console, openai_views, views, views_runs
from billing.dashboard import dashboard_view
from governance.authentication import ApiKeyAuthentication

from . import health, pages
from .docs import StaffOrApiKey

docs_auth = {"authentication_classes": [SessionAuthentication, ApiKeyAuthentication],
             "permission_classes": [StaffOrApiKey]}

urlpatterns = [
    path("", pages.home, name="home"),
    path("favicon.ico", pages.favicon, name="favicon"),
    path("health", health.liveness, name="health"),
    path("health/ready", health.readiness, name="health-ready"),
    path("metrics", health.metrics, name="metrics"),
    path("api/v1/agents", views.AgentListView.as_view(), name="agent-list"),
    path("api/v1/agents/<str:name>", views.AgentDetailView.as_view(), name="agent-detail"),
    path("api/v1/agents/<str:name>/health", views.AgentHealthView.as_view(), name="agent-health"),
    path("api/v1/agents/<str:name>/chat", views.ChatView.as_view(), name="agent-chat"),
    path("api/v1/agents/<str:name>/runs", views_runs.RunCreateView.as_view(), name="agent-runs"),
    path("api/v1/runs", views_runs.RunListView.as_view(), name="run-list"),
    path("api/v1/runs/<uuid:run_id>", views_runs.RunDetailView.as_view(), name="run-detail"),
    path("api/v1/runs/<uuid:run_id>/cancel", views_runs.RunCancelView.as_view(), name="run-cancel"),
    path("api/v1/runs/<uuid:run_id>/feedback", views_runs.RunFeedbackView.as_view(), name="run-feedback"),
    path("api/v1/sessions", views.SessionListView.as_view(), name="session-list"),
    path("api/v1/sessions/<uuid:session_id>", views.SessionDetailView.as_view(), name="session-detail"),
    path("api/v1/", include("governance.urls")),
    path("api/v1/", include("billing.urls")),
    path("api/v1/", include("experiments.urls")),
    path("v1/chat/completions", openai_views.ChatCompletionsView.as_view(), name="openai-chat-completions"),
    path("v1/models", openai_views.ModelListView.as_view(), name="openai-models"),
    path("v1/models/<str:name>", openai_views.ModelDetailView.as_view(), name="openai-model"),
    path("api/schema/", SpectacularAPIView.as_view(**docs_auth), name="schema"),
    # A page for people: staff signed in to the admin (others are sent to its login page).
    path("api/docs/", staff_member_required(SpectacularSwaggerView.as_view(url_name="schema", **docs_auth)),
         name="docs"),
    # The chat console for staff (its page and the JSON it reads; the chat itself is the WebSocket).
    path("console/api/agents", console.AgentsView.as_view(), name="console-agents"),
    path("console/api/sessions", console.SessionsView.as_view(), name="console-sessions"),
    path("console/api/sessions/<uuid:session_id>", console.SessionDetailView.as_view(), name="console-session"),
    path("console/api/feedback", console.FeedbackView.as_view(), name="console-feedback"),
    path("console/", console.console_page, name="console"),
    path("console/<str:agent>/", console.console_page, name="console-agent"),
    # The cost dashboard: an admin page (staff; admin_view sends others to the login page).
    path("admin/billing/dashboard/", admin.site.admin_view(dashboard_view), name="billing_dashboard"),
    path("admin/", admin.site.urls),
]

handler400 = "agentplatform.errors.handler400"
handler403 = "agentplatform.errors.handler403"
handler404 = "agentplatform.errors.handler404"
handler500 = "agentplatform.errors.handler500"

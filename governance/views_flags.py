"""GET /api/v1/flags: the caller's evaluated feature flags.

A plain DRF view (not the chat hot path): the flags come from the one cached entry, the agent
from its cache entry, so a warm call costs no query.
"""

from __future__ import annotations

from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiParameter, OpenApiResponse, extend_schema
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from agents.pipeline import authorize_agent
from agents.selectors import agent_spec

from .flags import all_flags, evaluate_flags


class FlagListView(APIView):
    """Every feature flag, evaluated for the calling key (its prefix and role) and, with
    `?agent=<name>`, for that agent too."""

    @extend_schema(
        parameters=[OpenApiParameter("agent", str, description="Evaluate agent-targeted flags for this agent "
                                                               "(one the key may use).")],
        responses={200: OpenApiResponse(OpenApiTypes.OBJECT, description='{"flags": {"<name>": true|false}}'),
                   401: OpenApiResponse(description="Missing or invalid API key."),
                   404: OpenApiResponse(description="Unknown agent, or one the key may not use.")},
    )
    def get(self, request: Request) -> Response:
        principal = request.user
        agent_name = request.query_params.get("agent") or None
        if agent_name is not None:
            agent_name = authorize_agent(principal, agent_spec(agent_name), agent_name).name
        flags = evaluate_flags(all_flags().values(), key_prefix=principal.prefix, role=principal.role,
                               agent_name=agent_name)
        return Response({"flags": dict(sorted(flags.items()))})

"""DRF authentication and permission by API key (sync views; the async chat views use
agents.api_views' own async path over the same selectors)."""

from __future__ import annotations

from drf_spectacular.extensions import OpenApiAuthenticationExtension
from rest_framework.authentication import BaseAuthentication

from agentplatform.errors import AuthenticationFailed

from .keys import key_used
from .selectors import presented_key, principal_for_key


class ApiKeyAuthentication(BaseAuthentication):
    def authenticate(self, request):
        key = presented_key(request.headers)
        if key is None:
            return None
        principal = principal_for_key(key)
        if principal is None:
            raise AuthenticationFailed("The API key is not valid, or it has been revoked or has expired.")
        key_used(principal)  # last_used_at, at most once a minute per key
        return principal, key

    def authenticate_header(self, request) -> str:
        return 'Bearer realm="api"'


class ApiKeyScheme(OpenApiAuthenticationExtension):
    """Documents API-key authentication in the OpenAPI schema (drf-spectacular)."""

    target_class = "governance.authentication.ApiKeyAuthentication"
    name = "ApiKey"

    def get_security_definition(self, auto_schema):
        return {"type": "http", "scheme": "bearer", "bearerFormat": "ap_<prefix>_<secret>",
                "description": "`Authorization: Bearer <key>` (or the header `X-API-Key: <key>`)."}

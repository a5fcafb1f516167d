"""Admin REST API for API keys (admin role only; other keys get 403, no key 401).

    POST  /api/v1/admin/api-keys                  create → 201, the secret in `key` (this once)
    GET   /api/v1/admin/api-keys                  list (?role=&enabled=&status=&limit=&offset=)
    GET   /api/v1/admin/api-keys/{prefix}         one key
    PATCH /api/v1/admin/api-keys/{prefix}         name, role, all_agents, agents, all_skills, allowed_skills,
                                                  limits, expires_at, enabled
    POST  /api/v1/admin/api-keys/{prefix}/rotate  {grace_seconds?} → the new secret in `key` (this once)
    POST  /api/v1/admin/api-keys/{prefix}/revoke  → the key's state; every secret of it stops working

Plain sync DRF views: this is not the chat path. Each validates at the edge and calls one
service, which writes the change and its audit entry (actor "key:<prefix>") together.

PATCH and revoke refuse to take away the last active admin key (409 last_admin_key): a key
could otherwise lock every key out of this API. `manage.py create_api_key --role admin` is the
way back in for whoever runs the server.
"""

from __future__ import annotations

from typing import Any

from drf_spectacular.utils import OpenApiParameter, OpenApiResponse, extend_schema
from rest_framework import generics, status
from rest_framework.request import Request
from rest_framework.response import Response

from agentplatform.asyncviews import client_ip
from agentplatform.errors import NotFound, request_id_of

from .keys import api_keys_with_status, key_used
from .models import ApiKey
from .permissions import IsAdminKey
from .serializers import (
    ApiKeyCreateSerializer,
    ApiKeyListFilterSerializer,
    ApiKeyRevokeSerializer,
    ApiKeyRotateSerializer,
    ApiKeySerializer,
    ApiKeyUpdateSerializer,
    ApiKeyWithSecretSerializer,
)
from .services import api_key_create, api_key_revoke, api_key_rotate, api_key_update

ERRORS = {
    400: OpenApiResponse(description="Invalid body or an unknown field: `error.param` names it."),
    401: OpenApiResponse(description="Missing or invalid API key."),
    403: OpenApiResponse(description="The key is not an admin key."),
    404: OpenApiResponse(description="No key with this prefix."),
}
LAST_ADMIN = OpenApiResponse(description="`last_admin_key`: the change would leave no active admin key.")


def _keys():
    return ApiKey.objects.select_related("created_by").prefetch_related("agents").order_by("-created_at", "-id")


def _with_secret(api_key: ApiKey, secret: str) -> dict:
    return {"key": secret, **ApiKeySerializer(api_key).data}


class _AdminKeyView(generics.GenericAPIView):
    permission_classes = [IsAdminKey]
    serializer_class = ApiKeySerializer
    queryset = ApiKey.objects.none()

    def initial(self, request: Request, *args: Any, **kwargs: Any) -> None:
        super().initial(request, *args, **kwargs)
        key_used(request.user)

    def audit_context(self) -> dict:
        request = self.request
        return {"actor": request.user.actor, "request_id": request_id_of(request) or "",
                "client_ip": client_ip(request._request)}

    def get_key(self, prefix: str) -> ApiKey:
        api_key = _keys().filter(prefix=prefix).first()
        if api_key is None:
            raise NotFound(f"No API key with prefix {prefix!r}.", code="api_key_not_found", param="prefix")
        return api_key

    @staticmethod
    def body(serializer_class, request: Request, **kwargs: Any) -> dict:
        serializer = serializer_class(data=request.data, **kwargs)
        serializer.is_valid(raise_exception=True)
        return dict(serializer.validated_data)


class ApiKeyListView(_AdminKeyView):
    @extend_schema(
        parameters=[OpenApiParameter("role", str, enum=ApiKey.Role.values),
                    OpenApiParameter("enabled", bool),
                    OpenApiParameter("status", str, enum=["active", "revoked", "expired", "disabled"])],
        responses={200: ApiKeySerializer(many=True), **ERRORS},
    )
    def get(self, request: Request) -> Response:
        # A plain dict: DRF reads a missing boolean in a QueryDict as an unticked checkbox (False).
        filters = ApiKeyListFilterSerializer(data=request.query_params.dict())
        filters.is_valid(raise_exception=True)
        queryset = _keys()
        data = filters.validated_data
        if "role" in data:
            queryset = queryset.filter(role=data["role"])
        if "enabled" in data:
            queryset = queryset.filter(enabled=data["enabled"])
        if "status" in data:
            queryset = api_keys_with_status(queryset, data["status"])
        page = self.paginate_queryset(queryset)
        return self.get_paginated_response(ApiKeySerializer(page, many=True).data)

    @extend_schema(request=ApiKeyCreateSerializer, responses={201: ApiKeyWithSecretSerializer, **ERRORS},
                   description="The full key is in `key`, in this response only; only its hash is stored.")
    def post(self, request: Request) -> Response:
        data = self.body(ApiKeyCreateSerializer, request)
        api_key, secret = api_key_create(
            name=data["name"], role=data["role"], agent_names=data.get("agents"), all_agents=data.get("all_agents"),
            allowed_skills=data.get("allowed_skills"), all_skills=data.get("all_skills"),
            rate_limit_rpm=data.get("rate_limit_rpm"), rate_limit_tpm=data.get("rate_limit_tpm"),
            expires_at=data.get("expires_at"), **self.audit_context())
        return Response(_with_secret(self.get_key(api_key.prefix), secret), status=status.HTTP_201_CREATED)


class ApiKeyDetailView(_AdminKeyView):
    @extend_schema(responses={200: ApiKeySerializer, **ERRORS})
    def get(self, request: Request, prefix: str) -> Response:
        return Response(ApiKeySerializer(self.get_key(prefix)).data)

    @extend_schema(request=ApiKeyUpdateSerializer, responses={200: ApiKeySerializer, **ERRORS, 409: LAST_ADMIN})
    def patch(self, request: Request, prefix: str) -> Response:
        api_key = self.get_key(prefix)
        data = self.body(ApiKeyUpdateSerializer, request, partial=True)
        api_key_update(api_key=api_key, fields=data, protect_last_admin=True, **self.audit_context())
        return Response(ApiKeySerializer(self.get_key(prefix)).data)


class ApiKeyRotateView(_AdminKeyView):
    @extend_schema(request=ApiKeyRotateSerializer,
                   responses={200: ApiKeyWithSecretSerializer, **ERRORS,
                              409: OpenApiResponse(description="The key is revoked.")},
                   description="The new secret (in `key`, this once) works at once; the previous one until "
                               "`previous_secret_expires_at` (null with grace_seconds 0: it stops at once). "
                               "A key keeps one previous secret: rotating again within the grace period "
                               "stops the secret before the previous one at once.")
    def post(self, request: Request, prefix: str) -> Response:
        api_key = self.get_key(prefix)
        data = self.body(ApiKeyRotateSerializer, request)
        api_key, secret = api_key_rotate(api_key=api_key, grace_seconds=data.get("grace_seconds"),
                                         **self.audit_context())
        return Response(_with_secret(self.get_key(prefix), secret))


class ApiKeyRevokeView(_AdminKeyView):
    @extend_schema(request=None, responses={200: ApiKeySerializer, **ERRORS, 409: LAST_ADMIN},
                   description="Every secret of the key (current and previous) stops working on every worker "
                               "within a moment. Revoking a revoked key is a no-op that answers the same.")
    def post(self, request: Request, prefix: str) -> Response:
        api_key = self.get_key(prefix)
        self.body(ApiKeyRevokeSerializer, request)
        api_key_revoke(api_key=api_key, protect_last_admin=True, **self.audit_context())
        return Response(ApiKeySerializer(self.get_key(prefix)).data)


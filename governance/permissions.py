"""Roles of API keys, as DRF permission classes, and the one rule for "own" data.

    admin      everything, including the admin REST API for keys (/api/v1/admin/...).
    developer  manage and inspect agents, and the sessions, runs and usage of its own key.
    client     call the agents it is allowed, read (and continue) its own sessions.

"Own" means made with the calling key. Keys are created by staff users (created_by) or by
admin keys, never by a developer key, so there is no key that "belongs" to another key: a
developer key sees what was done with itself, an admin key sees everything (`owned_by_key`).

A key without the role gets 403 in the JSON error shape (the permission raises our
PermissionDenied, naming the role needed); a request without a valid key gets 401, as DRF
decides before permissions when no authenticator succeeded.
"""

from __future__ import annotations

from django.db.models import QuerySet
from rest_framework.permissions import SAFE_METHODS, BasePermission

from agentplatform.errors import PermissionDenied

from .models import ApiKey
from .principal import Principal

ADMIN = ApiKey.Role.ADMIN.value
DEVELOPER = ApiKey.Role.DEVELOPER.value
CLIENT = ApiKey.Role.CLIENT.value


class HasApiKey(BasePermission):
    """Every API endpoint needs a valid key; roles refine this in the views."""

    def has_permission(self, request, view) -> bool:
        return isinstance(request.user, Principal)


class _HasRole(BasePermission):
    roles: frozenset[str] = frozenset()
    message = "This API key may not do that."

    def has_permission(self, request, view) -> bool:
        principal = request.user
        if not isinstance(principal, Principal):
            return False  # DRF answers 401: no valid key was presented
        if principal.role not in self.roles:
            raise PermissionDenied(self.message)
        return True


class IsAdminKey(_HasRole):
    """The admin REST API and anything that changes other keys."""

    roles = frozenset({ADMIN})
    message = "This endpoint needs an API key with the admin role."


class IsDeveloperKey(_HasRole):
    """Managing and inspecting agents, sessions and usage: developer or admin keys."""

    roles = frozenset({ADMIN, DEVELOPER})
    message = "This endpoint needs an API key with the developer or admin role."


class ReadOnlyForClients(_HasRole):
    """Any key may read (GET, HEAD, OPTIONS); changes need a developer or admin key."""

    roles = frozenset({ADMIN, DEVELOPER})
    message = "A client API key may only read here; changes need the developer or admin role."

    def has_permission(self, request, view) -> bool:
        if request.method in SAFE_METHODS:
            return isinstance(request.user, Principal)
        return super().has_permission(request, view)


def owned_by_key(queryset: QuerySet, principal: Principal, field: str = "api_key_id") -> QuerySet:
    """Rows the caller may see: all of them for an admin key, those made with the key otherwise."""
    if principal.is_admin:
        return queryset
    return queryset.filter(**{field: principal.key_id})

from __future__ import annotations

from rest_framework.permissions import BasePermission

from .principal import Principal


class HasApiKey(BasePermission):
    """Every API endpoint needs a valid key; roles refine this in the views."""

    def has_permission(self, request, view) -> bool:
        return isinstance(request.user, Principal)


class IsAdminKey(BasePermission):
    def has_permission(self, request, view) -> bool:
        return isinstance(request.user, Principal) and request.user.is_admin

from rest_framework.permissions import BasePermission

from governance.principal import Principal


class StaffOrApiKey(BasePermission):
    """The API docs and schema: staff signed in to the admin, or any valid API key."""

    def has_permission(self, request, view) -> bool:
        user = request.user
        return isinstance(user, Principal) or bool(user and getattr(user, "is_staff", False))

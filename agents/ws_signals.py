"""Close WebSocket chat connections the moment their credentials stop being valid, on every
worker (through the channel layer), instead of at their next message: an API key revoked or
disabled, a staff user deactivated, demoted or logged out. Sent once the change commits; a
channel layer that does not answer never fails the change (the next message is refused anyway)."""

from __future__ import annotations

import logging

from asgiref.sync import async_to_sync
from django.contrib.auth import get_user_model
from django.contrib.auth.signals import user_logged_out
from django.db import transaction
from django.db.models.signals import post_save
from django.dispatch import receiver

from governance.models import ApiKey

from .consumers import CLOSE_FORBIDDEN, CLOSE_UNAUTHENTICATED, websocket_close_for

logger = logging.getLogger("agents.consumers")


def _close_on_commit(*, key_id: int | None = None, user_id: int | None = None, code: int, message: str) -> None:
    def close() -> None:
        try:
            async_to_sync(websocket_close_for)(key_id=key_id, user_id=user_id, code=code, message=message)
        except Exception:  # noqa: BLE001 - the change stands; connections are refused at their next message
            logger.warning("could not push a WebSocket close (key %s, user %s)", key_id, user_id, exc_info=True)

    transaction.on_commit(close)


@receiver(post_save, sender=ApiKey, dispatch_uid="ws_close_revoked_key")
def _close_connections_of_a_dead_key(sender, instance: ApiKey, **kwargs) -> None:
    if instance.revoked_at is not None or not instance.enabled:
        _close_on_commit(key_id=instance.pk, code=CLOSE_UNAUTHENTICATED,
                         message="The API key was revoked or disabled.")


@receiver(post_save, sender=get_user_model(), dispatch_uid="ws_close_demoted_user")
def _close_connections_of_a_demoted_user(sender, instance, created: bool, update_fields=None, **kwargs) -> None:
    if created or (update_fields is not None and set(update_fields) <= {"last_login"}):
        return  # a sign-in, not a change of access
    if not (instance.is_active and instance.is_staff):
        _close_on_commit(user_id=instance.pk, code=CLOSE_FORBIDDEN, message="Staff access ended.")


@receiver(user_logged_out, dispatch_uid="ws_close_logged_out_user")
def _close_connections_of_a_logged_out_user(sender, request, user, **kwargs) -> None:
    if user is not None:
        _close_on_commit(user_id=user.pk, code=CLOSE_UNAUTHENTICATED, message="Signed out.")

"""Writes of the agents app outside the chat pipeline (which persists runs itself)."""

from __future__ import annotations

import uuid

from django.db import IntegrityError, transaction

from agentplatform.errors import Conflict
from governance.principal import Principal

from .models import Session


@transaction.atomic
def session_create(*, agent_id: int, principal: Principal, session_id: uuid.UUID | None = None, title: str = "",
                   metadata: dict | None = None) -> Session:
    session_id = session_id or uuid.uuid4()
    try:
        with transaction.atomic():
            return Session.objects.create(id=session_id, agent_id=agent_id, api_key_id=principal.key_id,
                                          title=title, metadata=metadata or {})
    except IntegrityError:
        # "Exists already" only when the primary key is what collided: any other constraint
        # (a JSON check, a foreign key) is a bug to see, not a 409.
        if Session.objects.filter(pk=session_id).exists():
            raise Conflict("A session with this id exists already.", code="session_exists", param="id") from None
        raise


@transaction.atomic
def session_delete(*, session: Session) -> None:
    """Delete a session and its messages; its runs stay (they are the usage history)."""
    session.delete()

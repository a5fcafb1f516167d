"""Writes of the agents app outside the chat pipeline (which persists runs itself)."""

from __future__ import annotations

import uuid

from django.db import IntegrityError, transaction
from django.utils import timezone

from agentplatform.errors import Conflict, NotFound
from governance.audit import audit_record, user_actor
from governance.principal import Principal

from .models import Run, Session

FEEDBACK_COMMENT_MAX_CHARS = 2000


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


def run_feedback_set(*, run_id: uuid.UUID, value: int | None, comment: str | None = None,
                     principal: Principal | None = None, user=None, request_id: str = "",
                     client_ip: str | None = None) -> Run:
    """Record a rating of an answer (1 up, -1 down, None cleared) with an optional comment,
    audited with it: the REST API's (`principal`: the key's own runs, an admin key any run) and
    the chat console's (`user`: the runs of the staff user's own sessions). Experiments count it
    per variant. `comment` None leaves the stored comment as it is."""
    with transaction.atomic():
        runs = Run.objects.select_for_update()
        if principal is not None:
            if not principal.is_admin:
                runs = runs.filter(api_key_id=principal.key_id)
            actor = principal.actor
        else:
            runs = runs.filter(session__user=user)
            actor = user_actor(user)
        run = runs.filter(pk=run_id).first()
        if run is None or run.status not in Run.FINAL_STATUSES:
            where = "of this key" if principal is not None else "in your sessions"
            raise NotFound(f"No such finished run {where} (a reply is stored once it has finished).",
                           code="run_not_found", param="run_id")
        previous = run.feedback
        run.feedback = value
        run.feedback_at = timezone.now() if value is not None else None
        fields = ["feedback", "feedback_at"]
        if comment is not None:
            run.feedback_comment = comment[:FEEDBACK_COMMENT_MAX_CHARS]
            fields.append("feedback_comment")
        run.save(update_fields=fields)
        details = {"value": value, "previous": previous, "agent_id": run.agent_id}
        if run.variant:
            details["variant"], details["experiment_id"] = run.variant, run.experiment_id
        if comment:
            details["comment"] = comment[:200]
        audit_record(actor=actor, action="run.feedback", target=f"run:{run.id}", details=details,
                     request_id=request_id, client_ip=client_ip)
    return run

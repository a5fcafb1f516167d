"""Celery doors into governance services (beat runs them; see CELERY_BEAT_SCHEDULE)."""

from celery import shared_task

from .audit import audit_chain_sequence_all
from .idempotency import idempotency_records_purge


@shared_task(name="governance.tasks.idempotency_records_purge_task")
def idempotency_records_purge_task() -> int:
    """Delete expired idempotency records; returns how many."""
    return idempotency_records_purge()


@shared_task(name="governance.tasks.audit_chain_sequence_task")
def audit_chain_sequence_task() -> int:
    """Chain the audit entries committed so far (after any running sequencer); returns how many."""
    return audit_chain_sequence_all()

"""Celery doors into governance services (beat runs them; see CELERY_BEAT_SCHEDULE)."""

from celery import shared_task

from .idempotency import idempotency_records_purge


@shared_task(name="governance.tasks.idempotency_records_purge_task")
def idempotency_records_purge_task() -> int:
    """Delete expired idempotency records; returns how many."""
    return idempotency_records_purge()

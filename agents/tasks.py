"""Celery doors into agents services (beat runs the sweeper; see CELERY_BEAT_SCHEDULE)."""

from __future__ import annotations

from celery import shared_task
from celery.signals import worker_ready


@shared_task(name="agents.tasks.sweep_interrupted_runs_task")
def sweep_interrupted_runs_task() -> int:
    """End runs whose worker died (lease ran out) as interrupted; returns how many."""
    from .recovery import sweep_interrupted_runs

    return sweep_interrupted_runs()


@worker_ready.connect
def _sweep_when_worker_starts(**kwargs) -> None:
    from .recovery import sweep_on_startup

    sweep_on_startup()

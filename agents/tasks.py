"""Celery doors into agents services: async runs and their callbacks (agents.runs), and the beat
tasks (the sweeper of interrupted runs, lost enqueues; see CELERY_BEAT_SCHEDULE). Tasks take ids
and call a service; the services import them to enqueue, so they import the services when run.

Async runs are acknowledged late (CELERY_TASK_ACKS_LATE) and idempotent: a redelivery of a run
that ended, or that another delivery runs right now, does nothing (agents.runs.run_execute)."""

from __future__ import annotations

import uuid

from celery import shared_task
from celery.signals import worker_ready


@shared_task(name="agents.tasks.sweep_interrupted_runs_task")
def sweep_interrupted_runs_task() -> int:
    """End runs whose worker died (lease ran out) as interrupted; returns how many."""
    from .recovery import sweep_interrupted_runs

    return sweep_interrupted_runs()


@shared_task(name="agents.tasks.execute_run_task")
def execute_run_task(run_id: str) -> str:
    """Execute one queued async run (Run id) through the pipeline; returns what happened."""
    from agentplatform.background import background_run

    from .runs import run_execute

    return background_run(run_execute(uuid.UUID(run_id)))


@shared_task(bind=True, name="agents.tasks.deliver_run_callback_task", max_retries=None)
def deliver_run_callback_task(self, run_id: str) -> str:
    """POST a finished run to its callback URL; retried with backoff, then a dead letter."""
    from agentplatform.background import background_run

    from .runs import callback_retry_countdown, run_callback_attempt

    attempt = background_run(run_callback_attempt(uuid.UUID(run_id)))
    if attempt.status == "retry":
        # The attempt count lives in the Run row, which decides when it is dead; Celery's cap is off.
        raise self.retry(countdown=callback_retry_countdown(attempt.attempts), max_retries=None)
    return attempt.status


@shared_task(name="agents.tasks.requeue_lost_runs_task")
def requeue_lost_runs_task() -> int:
    """Enqueue again queued runs and pending callbacks whose enqueue was lost; returns how many."""
    from .runs import runs_requeue_lost

    return runs_requeue_lost()


@worker_ready.connect
def _sweep_when_worker_starts(**kwargs) -> None:
    from .recovery import sweep_on_startup

    sweep_on_startup()

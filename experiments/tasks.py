"""Celery doors into the experiments services: shadow runs, and the canary beat task."""

from __future__ import annotations

from celery import shared_task


@shared_task(name="experiments.tasks.shadow_run_task")
def shadow_run_task(shadow_id: int) -> str:
    """Answer one shadow run (experiments.shadow) on the process's background loop."""
    from agentplatform.background import background_run

    from .shadow import shadow_run_execute

    return background_run(shadow_run_execute(shadow_id))


@shared_task(name="experiments.tasks.canary_advance_task")
def canary_advance_task() -> int:
    """Check every ramping canary whose next step is due: advance it, or roll it back."""
    from .canary import canaries_advance

    return canaries_advance()

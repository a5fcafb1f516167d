"""Celery doors into billing services: alert deliveries (enqueued on commit by billing.alerts)
and the beat tasks (CELERY_BEAT_SCHEDULE in settings). Tasks take ids and call a service."""

from __future__ import annotations

from celery import shared_task

from .alerts import alert_delivery_attempt, alert_retry_countdown, check_budget_alerts
from .rollover import budget_period_rollover


def _deliver(task, delivery_id: int) -> str:
    while True:
        attempt = alert_delivery_attempt(delivery_id=delivery_id)
        if attempt.status != "retry":
            return attempt.status
        if not task.request.is_eager:
            # The attempt count lives in the AlertDelivery row, which decides when it is dead;
            # Celery's own cap is off.
            raise task.retry(countdown=alert_retry_countdown(attempt.attempts), max_retries=None)
        # Eager (the embedded default, on billing.alerts' background thread): the next attempt
        # at once, without the countdown. Not task.retry(): with task_eager_propagates an eager
        # retry raises instead of running again.


@shared_task(bind=True, name="billing.tasks.deliver_alert_email_task", max_retries=None)
def deliver_alert_email_task(self, delivery_id: int) -> str:
    """Send one budget alert e-mail (AlertDelivery id); retried with backoff, then dead."""
    return _deliver(self, delivery_id)


@shared_task(bind=True, name="billing.tasks.deliver_alert_webhook_task", max_retries=None)
def deliver_alert_webhook_task(self, delivery_id: int) -> str:
    """POST one budget alert to its webhook (AlertDelivery id); retried with backoff, then dead."""
    return _deliver(self, delivery_id)


@shared_task(name="billing.tasks.check_budget_alerts_task")
def check_budget_alerts_task() -> int:
    """Fire thresholds no settlement fired; returns how many alerts."""
    return check_budget_alerts()


@shared_task(name="billing.tasks.budget_period_rollover_task")
def budget_period_rollover_task() -> dict:
    """New periods' spend rows; stale reservations of past periods released."""
    result = budget_period_rollover()
    return {"created": result.created, "released": result.released}


@shared_task(name="billing.tasks.rollup_usage_task")
def rollup_usage_task() -> int:
    """Rebuild the UsageRollup days that need it; returns how many days."""
    from .rollups import rollup_pending_days  # written alongside; imported when the task runs

    return rollup_pending_days()

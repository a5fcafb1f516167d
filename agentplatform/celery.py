"""Celery app: configured from Django settings (CELERY_* names), tasks discovered per app."""

import os

from celery import Celery, signals

from .metrics import celery_signals_connect, metrics_port_serve

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "agentplatform.settings")

app = Celery("agentplatform")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()
celery_signals_connect()  # celery_tasks_total, celery_task_duration_seconds (agentplatform.metrics)


@signals.worker_init.connect
def _worker_metrics_port(**kwargs) -> None:
    """A worker host without a web process still shows its metrics on METRICS_PORT."""
    from django.conf import settings

    if settings.METRICS_PORT:
        metrics_port_serve(settings.METRICS_PORT)


def broker_call(fn):
    """fn() against the broker, through agentplatform.cache's outage detector when the broker is
    a Redis: while it is down, raises at once (ConnectionError naming the outage) instead of
    stalling on connection retries; a failure is reported to the detector, a success ends it."""
    from .cache import redis_outage

    url = str(app.conf.broker_url or "")
    outage = redis_outage(url) if url.startswith(("redis://", "rediss://", "unix://")) else None
    if outage is None:
        return fn()
    if outage.is_down():
        raise ConnectionError(f"Redis {outage.status()['detail']}")
    try:
        result = fn()
    except Exception as exc:
        outage.failed("broker", exc)
        raise
    outage.ok()
    return result


def task_enqueue(task, *, args: list) -> None:
    """Send `task` to the broker (broker_call): the one door for enqueues from the request path.
    Callers log a failure and rely on the beat's backstops to enqueue again
    (agents.runs.runs_requeue_lost, the alert scan)."""
    # One quick retry, not kombu's default of three with back-off: the request waits on it.
    broker_call(lambda: task.apply_async(args=args, retry_policy={"max_retries": 1, "interval_start": 0,
                                                                   "interval_step": 0.2}))

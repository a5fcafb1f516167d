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

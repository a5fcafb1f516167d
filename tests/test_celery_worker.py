"""A real Celery worker (`celery -A agentplatform worker`, a subprocess) with the Redis broker,
against the test database: the beat task's scan fires an alert there, the worker's own enqueue
of its delivery goes through Redis, the webhook fails once, is retried with its countdown, and
arrives signed at a local HTTP server; the AlertDelivery row ends `sent`.

Each run uses a queue of its own (CELERY_TASK_DEFAULT_QUEUE), so it shares a Redis with anything."""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import subprocess
import sys
import time
import uuid
from decimal import Decimal
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import pytest
from celery import Celery
from django.conf import settings as django_settings
from django.db import connection
from django.utils import timezone

from billing.budgets import budget_create, period_start
from billing.models import AlertDelivery, BudgetAlert, BudgetSpend
from conftest import ROOT, stop_processes
from test_alerts import Hook, wait_until

pytestmark = [pytest.mark.slow, pytest.mark.redis, pytest.mark.django_db(transaction=True)]

SECRET = "worker-test-secret"
# The worker's platform environment is this test's alone.
PLATFORM_VARS = ("DATABASE_URL", "REDIS_URL", "CACHE_URL", "CELERY_BROKER_URL", "CELERY_TASK_ALWAYS_EAGER",
                 "CELERY_TASK_DEFAULT_QUEUE", "TEST_DATABASE_NAME", "READ_DOT_ENV", "BUDGET_ALERT_EMAILS",
                 "BUDGET_ALERT_WEBHOOK_URL", "BUDGET_ALERT_WEBHOOK_SECRET", "BUDGET_ALERT_MAX_RETRIES",
                 "BUDGET_ALERT_RETRY_BACKOFF_SECONDS", "EMAIL_URL")


def _broker_url() -> str:
    return django_settings.REDIS_URL or os.environ.get("TEST_REDIS_URL") or "redis://127.0.0.1:6379/15"


def _redis_or_skip(url: str):
    import redis

    client = redis.Redis.from_url(url, socket_connect_timeout=1, socket_timeout=2)
    try:
        client.ping()
    except redis.RedisError as exc:
        pytest.skip(f"a real Celery worker needs the Redis broker at {url}, which does not answer ({exc})")
    return client


def _worker_database_url() -> str:
    """The test database pytest-django made, as the worker's DATABASE_URL."""
    name = str(connection.settings_dict["NAME"])
    if connection.vendor == "postgresql":
        parts = urlsplit(os.environ["DATABASE_URL"])
        return urlunsplit(parts._replace(path="/" + name))
    if connection.vendor == "sqlite" and "memory" not in name:
        return "sqlite:///" + str(Path(name).resolve())
    pytest.skip(f"the worker cannot share a {connection.vendor} test database named {name!r}")


@pytest.fixture
def worker(tmp_path):
    """Start a worker on a queue of its own; yields (sender app, queue, log path)."""
    broker = _broker_url()
    redis_client = _redis_or_skip(broker)
    queue = f"test-alerts-{uuid.uuid4().hex[:12]}"
    env = {k: v for k, v in os.environ.items() if k not in PLATFORM_VARS}
    env.update(DJANGO_SETTINGS_MODULE="agentplatform.settings", DATABASE_URL=_worker_database_url(),
               CELERY_BROKER_URL=broker, CELERY_TASK_ALWAYS_EAGER="false", CELERY_TASK_DEFAULT_QUEUE=queue,
               BUDGET_ALERT_WEBHOOK_SECRET=SECRET, BUDGET_ALERT_RETRY_BACKOFF_SECONDS="0.5",
               BUDGET_ALERT_MAX_RETRIES="3", LOG_LEVEL="INFO", VAR_DIR=str(tmp_path))
    if django_settings.REDIS_URL:
        env["REDIS_URL"] = django_settings.REDIS_URL
    if not env.get("SECRET_KEY"):
        env["DEBUG"] = "1"
    log_path = tmp_path / "worker.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "agentplatform", "worker", "--pool", "solo", "--loglevel", "INFO",
             "--without-gossip", "--without-mingle", "--without-heartbeat", "--hostname", f"{queue}@%h"],
            cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    # Not the current app: the platform's tasks (shared_task proxies) stay bound to agentplatform.celery.
    sender = Celery("test-sender", broker=broker, set_as_current=False)
    sender.conf.broker_connection_retry_on_startup = True
    try:
        deadline = time.monotonic() + 60
        while b" ready." not in log_path.read_bytes():
            assert process.poll() is None, f"the worker exited:\n{log_path.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"the worker did not start:\n{log_path.read_text()[-3000:]}"
            time.sleep(0.1)
        yield sender, queue, log_path
    finally:
        stop_processes([process])
        sender.close()
        redis_client.delete(queue, f"_kombu.binding.{queue}")
        redis_client.close()


def test_a_real_worker_fires_retries_and_delivers_an_alert(worker, make_agent):
    sender, queue, log_path = worker
    hook = Hook([500, 200])
    try:
        make_agent(name="echo")
        # A `total` budget: its period never turns over between this process making the spend
        # and the worker's scan (a daily one would, at midnight).
        budget = budget_create(scope="agent", agent_name="echo", period="total", limit_usd=Decimal("2"),
                               alert_thresholds=[50], alert_webhook_url=hook.url)
        start = period_start("total", timezone.now())
        BudgetSpend.objects.create(budget=budget, period_start=start, spent_usd=Decimal("1.2"))

        # What beat sends every minute, to the worker's queue.
        sender.send_task("billing.tasks.check_budget_alerts_task", queue=queue)

        def sent() -> list[AlertDelivery]:
            return list(AlertDelivery.objects.filter(status=AlertDelivery.Status.SENT))

        [delivery] = wait_until(sent, timeout=45, what=f"the delivery; worker log:\n{log_path.read_text()[-3000:]}")
    finally:
        hook.close()

    alert = BudgetAlert.objects.get()
    assert (alert.budget_id, alert.period_start, alert.threshold) == (budget.id, start, 50)
    assert delivery.alert_id == alert.id and delivery.attempts == 2  # failed once, retried by the worker
    assert len(hook.received) == 2
    last = hook.received[-1]
    assert last["headers"]["x-agentplatform-signature"] == \
        "sha256=" + hmac.new(SECRET.encode(), last["body"], hashlib.sha256).hexdigest()
    payload = json.loads(last["body"])
    assert (payload["alert_id"], payload["attempt"], payload["threshold"]) == (alert.id, 2, 50)
    log = log_path.read_text()
    assert "billing.tasks.deliver_alert_webhook_task" in log and "retry" in log.lower()

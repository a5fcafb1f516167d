"""Async runs (agents.runs): POST /api/v1/agents/{name}/runs queues a run that a worker executes
through the one pipeline; GET /api/v1/runs[/{id}], cancel, callbacks, dead letters.

The embedded lane runs them as the embedded default does (eager Celery: the run proceeds on the
process's background loop while the test polls the API); the `openai` provider talks to the
fake upstream, callbacks go to a real local HTTP server. The worker tests (production lane) run
real `celery worker` subprocesses against Redis and the test database, one of them killed with
SIGKILL mid-run."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import ipaddress
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from datetime import timedelta
from decimal import Decimal

import pytest
from django.contrib.auth import get_user_model
from django.test import Client
from django.utils import timezone

from agentplatform.celery import app as celery_app
from agents.models import DeadLetter, Message, Run, Session
from agents.recovery import sweep_interrupted_runs
from agents.runs import run_execute, runs_requeue_lost
from billing.budgets import budget_create
from billing.models import ModelPrice, UsageRecord
from conftest import ROOT, Api, assert_error, orm, stop_processes
from governance.models import ApiKey, AuditLog
from governance.services import api_key_revoke
from test_alerts import Hook, wait_until

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.usefixtures("eager_celery")]

RUNS = "/api/v1/agents/{}/runs"
MODEL = "openai/async-model"
SECRET = "whsec-runs-0123456789"
FINAL = ("succeeded", "failed", "cancelled", "interrupted")


@pytest.fixture
def no_worker(eager_celery):
    """Runs stay queued: tasks go to the broker (memory://, or Redis on the production lane) and
    no worker consumes them; the queue is purged afterwards."""
    celery_app.conf.task_always_eager = False
    yield
    celery_app.control.purge()


@pytest.fixture(autouse=True)
def _runs_settle():
    """No run of a test may still be executing on the background loop when its data is flushed."""
    yield
    deadline = time.monotonic() + 20
    while Run.objects.filter(status=Run.Status.RUNNING, transport=Run.Transport.TASK).exists():
        assert time.monotonic() < deadline, "an async run was still running after its test"
        time.sleep(0.05)


@pytest.fixture
def runs_settings(openai_settings):
    settings = openai_settings
    settings.RUN_CALLBACK_SECRET = SECRET
    settings.RUN_CALLBACK_RETRY_BACKOFF_SECONDS = 0.05
    settings.RUN_CALLBACK_MAX_RETRIES = 2
    settings.RUN_CANCEL_POLL_SECONDS = 0.1
    # The callback receiver listens on 127.0.0.1: exempt it from the public-addresses rule.
    settings.HTTP_FETCH_ALLOW_PRIVATE_NETWORKS = (ipaddress.ip_network("127.0.0.1/32"),)
    return settings


@pytest.fixture
def agent(make_agent, runs_settings):
    ModelPrice.objects.create(model=MODEL, input_per_1m=Decimal("1"), output_per_1m=Decimal("2"),
                              effective_from=timezone.now() - timedelta(days=1))
    return make_agent(name="worker", model=MODEL, system_prompt="Be brief.")


@pytest.fixture
def hooks():
    started: list[Hook] = []

    def start(*statuses: int) -> Hook:
        hook = Hook(list(statuses) or [200])
        started.append(hook)
        return hook

    yield start
    for hook in started:
        hook.close()


async def poll(api: Api, run_id: str, *, until=FINAL, timeout: float = 20.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        response = await api.get(f"/api/v1/runs/{run_id}")
        assert response.status_code == 200, response.text
        body = response.json()
        if body["status"] in until:
            return body
        assert time.monotonic() < deadline, f"run {run_id} stayed {body['status']}"
        await asyncio.sleep(0.05)


async def queue(api: Api, body: dict, agent: str = "worker", **kwargs):
    return await api.post(RUNS.format(agent), body, **kwargs)


def signed(received: dict) -> bool:
    expected = "sha256=" + hmac.new(SECRET.encode(), received["body"], hashlib.sha256).hexdigest()
    return hmac.compare_digest(received["headers"].get("x-agentplatform-signature", ""), expected)


# --- queue, execute, poll -----------------------------------------------------------------------


async def test_it_queues_a_run_that_a_worker_executes_through_the_pipeline(agent, make_key, fake_upstream):
    api = Api(await orm(make_key))
    response = await queue(api, {"message": "Hello [tokens:3]", "metadata": {"ticket": 7}})

    assert response.status_code == 202, response.text
    queued = response.json()
    assert queued["status"] in ("queued", "running", "succeeded")  # the eager worker may be quick
    assert response.headers["Location"] == f"/api/v1/runs/{queued['id']}"
    assert queued["agent"] == "worker" and queued["transport"] == "task" and queued["session_id"]

    done = await poll(api, queued["id"])
    assert done["status"] == "succeeded", done
    assert done["output"] == "w1 w2 w3"
    assert done["usage"]["completion_tokens"] == 3 and done["usage"]["prompt_tokens"] > 0
    assert Decimal(done["cost_usd"]) > 0
    assert done["error"] is None and done["attempts"] == 1 and done["metadata"] == {"ticket": 7}
    assert done["started_at"] and done["finished_at"] and done["queued_at"] <= done["started_at"]

    run = await orm(Run.objects.get, pk=queued["id"])
    assert (run.transport, run.status, run.input) == ("task", "succeeded", {})  # input dropped once done
    records = await orm(lambda: list(UsageRecord.objects.filter(run_id=run.id)))
    assert len(records) == 1 and records[0].starts_run and sum(r.cost_usd for r in records) == Decimal(done["cost_usd"])
    messages = await orm(lambda: list(Message.objects.filter(session_id=queued["session_id"]).values_list(
        "role", "content")))
    assert messages == [("user", "Hello [tokens:3]"), ("assistant", "w1 w2 w3")]
    served = await orm(lambda: AuditLog.objects.filter(action="request.served").get())
    assert served.details["transport"] == "task" and served.details["run_id"] == queued["id"]
    assert served.details["status"] == "succeeded"

    # The next run continues the session, as chat does.
    again = await queue(api, {"message": "And now? [tokens:1]", "session_id": queued["session_id"]})
    assert (await poll(api, again.json()["id"]))["status"] == "succeeded"
    assert await orm(Message.objects.filter(session_id=queued["session_id"]).count) == 4


@pytest.mark.parametrize("body, param", [
    ({}, "message"),
    ({"message": ""}, "message"),
    ({"message": "hi", "stream": True}, "stream"),
    ({"message": "hi", "callback_url": "ftp://example.com/hook"}, "callback_url"),
    ({"message": "hi", "callback_url": "https://user:pw@example.com/hook"}, "callback_url"),
    ({"message": "hi", "callback_url": 42}, "callback_url"),
    ({"message": "hi", "session_id": "not-a-uuid"}, "session_id"),
    ({"message": "hi", "metadata": [1]}, "metadata"),
])
async def test_it_refuses_bad_input_naming_the_field(agent, make_key, body, param):
    response = await queue(Api(await orm(make_key)), body)

    assert_error(response, 400, param=param)
    assert await orm(Run.objects.count) == 0


async def test_it_refuses_callbacks_to_addresses_that_are_not_public(agent, make_key, runs_settings):
    runs_settings.HTTP_FETCH_ALLOW_PRIVATE_NETWORKS = ()
    api = Api(await orm(make_key))

    for url in ("http://127.0.0.1:9/hook", "http://169.254.169.254/latest", "http://[::1]/x", "http://10.1.2.3/"):
        error = assert_error(await queue(api, {"message": "hi", "callback_url": url}), 400, "invalid_field",
                             param="callback_url")
        assert "not a public address" in error["message"]
    assert await orm(Run.objects.count) == 0


async def test_it_answers_404_for_agents_and_sessions_the_key_may_not_use(agent, make_agent, make_key):
    await orm(make_agent, name="other")
    mine, theirs = await orm(make_key, agents=["worker"]), await orm(make_key)
    session = (await queue(Api(theirs), {"message": "hi [tokens:1]"})).json()["session_id"]

    assert_error(await queue(Api(mine), {"message": "hi"}, agent="other"), 404, "agent_not_found")
    assert_error(await queue(Api(mine), {"message": "hi"}, agent="nobody"), 404, "agent_not_found")
    assert_error(await queue(Api(mine), {"message": "hi", "session_id": session}), 404, "session_not_found")
    assert_error(await queue(Api(""), {"message": "hi"}, key=""), 401)


# --- lists, filters, scoping ------------------------------------------------------------------------


async def test_it_lists_the_callers_runs_newest_first_with_filters_and_pages(agent, make_agent, make_key):
    await orm(make_agent, name="second", model=MODEL)
    one, two, admin = await orm(make_key), await orm(make_key), await orm(make_key, role="admin")
    a = (await queue(Api(one), {"message": "first [tokens:1]"})).json()
    b = (await queue(Api(one), {"message": "second [fault:400]"}, agent="second")).json()
    c = (await queue(Api(two), {"message": "someone else's [tokens:1]"})).json()
    for api, run in ((Api(one), a), (Api(one), b), (Api(two), c)):
        await poll(api, run["id"])

    page = (await Api(one).get("/api/v1/runs")).json()
    assert page["count"] == 2 and [r["id"] for r in page["results"]] == [b["id"], a["id"]]
    assert {r["status"] for r in page["results"]} == {"succeeded", "failed"}
    assert (await Api(admin).get("/api/v1/runs")).json()["count"] == 3

    async def ids(**params) -> list[str]:
        response = await Api(one).get("/api/v1/runs", params=params)
        assert response.status_code == 200, response.text
        return [r["id"] for r in response.json()["results"]]

    assert await ids(agent="second") == [b["id"]]
    assert await ids(status="succeeded") == [a["id"]]
    assert await ids(status="failed") == [b["id"]]
    assert await ids(session_id=a["session_id"]) == [a["id"]]
    assert await ids(transport="rest") == []
    today = timezone.now().date()
    assert await ids(**{"from": today.isoformat()}) == [b["id"], a["id"]]
    assert await ids(to=(today - timedelta(days=1)).isoformat()) == []
    assert await ids(limit=1) == [b["id"]] and await ids(limit=1, offset=1) == [a["id"]]

    for params, param in (({"status": "done"}, "status"), ({"session_id": "x"}, "session_id"),
                          ({"from": "yesterday"}, "from"), ({"from": "2025-02-01", "to": "2025-01-01"}, "to"),
                          ({"transport": "pigeon"}, "transport")):
        assert_error(await Api(one).get("/api/v1/runs", params=params), 400, param=param)

    # Another key's run is not found, also to cancel; an admin key sees it.
    assert_error(await Api(one).get(f"/api/v1/runs/{c['id']}"), 404, "run_not_found")
    assert_error(await Api(one).post(f"/api/v1/runs/{c['id']}/cancel"), 404, "run_not_found")
    assert (await Api(admin).get(f"/api/v1/runs/{c['id']}")).json()["output"] == "w1"
    assert_error(await Api(one).get(f"/api/v1/runs/{uuid.uuid4()}"), 404, "run_not_found")


# --- cancel ------------------------------------------------------------------------------------------


async def test_a_queued_run_is_cancelled_at_once_and_never_runs(agent, make_key, no_worker, fake_upstream):
    api = Api(await orm(make_key))
    run = (await queue(api, {"message": "never [tokens:2]"})).json()
    assert run["status"] == "queued" and run["started_at"] is None

    response = await api.post(f"/api/v1/runs/{run['id']}/cancel")
    assert response.status_code == 200, response.text
    assert response.json()["status"] == "cancelled" and response.json()["cancel_requested"] is True
    again = await api.post(f"/api/v1/runs/{run['id']}/cancel")
    assert again.status_code == 200 and again.json()["status"] == "cancelled"

    # Its task, delivered after all, finds it cancelled: nothing runs, nothing is billed.
    assert await run_execute(uuid.UUID(run["id"])) == "ended already (cancelled)"
    assert fake_upstream.stats()["requests"] == 0
    assert await orm(UsageRecord.objects.count) == 0
    assert await orm(AuditLog.objects.filter(action="run.cancelled", target=f"run:{run['id']}").count) == 1
    assert not await orm(DeadLetter.objects.exists)


async def test_a_running_run_is_cancelled_by_its_worker(agent, make_key, fake_upstream):
    api = Api(await orm(make_key))
    run = (await queue(api, {"message": "slow [latency:5000]"})).json()
    await poll(api, run["id"], until=("running",))
    started = time.monotonic()

    response = await api.post(f"/api/v1/runs/{run['id']}/cancel")
    assert response.status_code == 200
    assert response.json()["cancel_requested"] is True

    done = await poll(api, run["id"])
    assert done["status"] == "cancelled" and time.monotonic() - started < 3
    stored = await orm(Run.objects.get, pk=run["id"])
    assert stored.cancel_requested and stored.finished_at and stored.lease_expires_at is None
    assert not await orm(DeadLetter.objects.exists)
    finished = await queue(api, {"message": "quick [tokens:1]"})
    await poll(api, finished.json()["id"])
    assert_error(await api.post(f"/api/v1/runs/{finished.json()['id']}/cancel"), 409, "run_not_cancellable")


# --- idempotency ------------------------------------------------------------------------------------


async def test_an_idempotency_key_replays_the_queued_answer_and_runs_once(agent, make_key, fake_upstream):
    api = Api(await orm(make_key))
    headers = {"Idempotency-Key": "order-42"}
    first = await queue(api, {"message": "once [tokens:2]"}, headers=headers)
    second = await queue(api, {"message": "once [tokens:2]"}, headers=headers)

    assert first.status_code == second.status_code == 202
    assert second.headers["Idempotent-Replayed"] == "true"
    assert second.json()["id"] == first.json()["id"]
    assert (await poll(api, first.json()["id"]))["status"] == "succeeded"
    assert await orm(Run.objects.count) == 1
    assert fake_upstream.stats()["requests"] == 1
    assert_error(await queue(api, {"message": "another"}, headers=headers), 422, "idempotency_key_reused")


# --- callbacks ---------------------------------------------------------------------------------------


async def test_the_callback_is_signed_retried_and_delivered(agent, make_key, hooks):
    hook = hooks(500, 200)
    api = Api(await orm(make_key))
    run = (await queue(api, {"message": "call me [tokens:2]", "callback_url": hook.url})).json()
    assert run["callback"] == {"status": "pending", "attempts": 0, "delivered_at": None, "error": None}

    done = await poll(api, run["id"])
    await orm(wait_until, lambda: Run.objects.filter(pk=run["id"], callback_status="sent").exists(),
              what="the callback")
    assert len(hook.received) == 2  # a 500 first, retried with backoff
    last = hook.received[-1]
    assert signed(last)
    assert last["headers"]["x-agentplatform-event"] == "run.completed"
    assert last["headers"]["x-agentplatform-delivery"] == run["id"]
    payload = json.loads(last["body"])
    assert (payload["type"], payload["attempt"], payload["id"]) == ("run.completed", 2, run["id"])
    assert payload["status"] == "succeeded" and payload["output"] == "w1 w2"
    assert payload["usage"] == done["usage"] and payload["cost_usd"] == done["cost_usd"]
    assert payload["error"] is None
    shown = (await api.get(f"/api/v1/runs/{run['id']}")).json()["callback"]
    assert shown["status"] == "sent" and shown["attempts"] == 2 and shown["delivered_at"]


async def test_a_callback_that_keeps_failing_becomes_a_dead_letter_and_is_retried(agent, make_key, hooks,
                                                                                   staff_client):
    hook = hooks(503)
    api = Api(await orm(make_key))
    run = (await queue(api, {"message": "alice@example.com [tokens:1]", "callback_url": hook.url})).json()
    await poll(api, run["id"])
    [letter] = await orm(wait_until, lambda: list(DeadLetter.objects.all()), what="the dead letter")

    assert len(hook.received) == 3  # 1 + RUN_CALLBACK_MAX_RETRIES
    assert (letter.task, letter.error_code, letter.attempts) == ("agents.tasks.deliver_run_callback_task",
                                                                 "callback_failed", 3)
    assert "HTTP 503" in letter.error_message
    assert "token=abc" not in json.dumps(letter.context)  # the URL's query is never kept
    assert "alice@example.com" not in json.dumps(letter.context)
    assert (await orm(Run.objects.get, pk=run["id"])).callback_status == "dead"

    hook.statuses = [200]
    await orm(admin_retry, staff_client, [letter.pk])
    await orm(wait_until, lambda: Run.objects.filter(pk=run["id"], callback_status="sent").exists(),
              what="the retried callback")
    assert signed(hook.received[-1]) and json.loads(hook.received[-1]["body"])["attempt"] == 1
    assert await orm(AuditLog.objects.filter(action="run.callback.retried").count) == 1


# --- failures and dead letters ------------------------------------------------------------------------


@pytest.fixture
def staff_client(db):
    user = get_user_model().objects.create_superuser("root", "root@example.com", "pw-0123456789")
    client = Client()
    client.force_login(user)
    return client


def admin_retry(client: Client, ids: list[int]):
    response = client.post("/admin/agents/deadletter/", {"action": "retry", "_selected_action": ids}, follow=True)
    assert response.status_code == 200
    return response


async def test_a_permanent_failure_lands_in_the_dead_letters_and_the_admin_retries_it(
        agent, make_key, staff_client, fake_upstream):
    api = Api(await orm(make_key))
    # The upstream refuses the first request (400: permanent, not retried within the run), then recovers.
    message = "Mail bob@example.com, card 4111 1111 1111 1111 [fault:400] [fault-times:1] [tokens:2]"
    run = (await queue(api, {"message": message, "metadata": {"email": "bob@example.com"}})).json()

    failed = await poll(api, run["id"])
    assert failed["status"] == "failed" and failed["error"]["code"]
    assert fake_upstream.stats()["requests"] == 1
    [letter] = await orm(lambda: list(DeadLetter.objects.all()))
    assert (letter.task, letter.error_code, letter.attempts) == ("agents.tasks.execute_run_task",
                                                                 failed["error"]["code"], 1)
    context = json.dumps(letter.context)
    assert letter.context["agent"] == "worker" and letter.context["messages"][0]["role"] == "user"
    assert "bob@example.com" not in context and "4111 1111 1111 1111" not in context
    assert (await orm(Run.objects.get, pk=run["id"])).input["messages"]  # kept for the retry

    page = await orm(lambda: staff_client.get("/admin/agents/deadletter/"))
    assert page.status_code == 200 and run["id"][:8].encode() in page.content
    detail = await orm(lambda: staff_client.get(f"/admin/agents/deadletter/{letter.pk}/change/"))
    assert detail.status_code == 200 and b"bob@example.com" not in detail.content

    await orm(admin_retry, staff_client, [letter.pk])
    done = await poll(api, run["id"], until=("succeeded",))
    assert done["output"] == "w1 w2" and done["attempts"] == 2 and done["error"] is None
    letter = await orm(DeadLetter.objects.get, pk=letter.pk)
    assert letter.retried_at is not None and letter.retried_by == "user:root"
    # Both attempts are billed, the run counted as one request.
    records = await orm(lambda: list(UsageRecord.objects.filter(run_id=run["id"]).order_by("id")))
    assert [r.starts_run for r in records] == [True, False]
    assert await orm(AuditLog.objects.filter(action="run.retried", target=f"run:{run['id']}").count) == 1
    # A retried letter is not retried twice.
    await orm(admin_retry, staff_client, [letter.pk])
    assert (await orm(Run.objects.get, pk=run["id"])).status == "succeeded"


async def test_limits_and_budgets_refuse_a_queued_run_when_it_executes(agent, make_key, fake_upstream):
    limited = await orm(make_key, rate_limit_rpm=1)
    api = Api(limited)
    first = (await queue(api, {"message": "one [tokens:1]"})).json()
    await poll(api, first["id"])
    refused = await poll(api, (await queue(api, {"message": "two [tokens:1]"})).json()["id"])
    assert refused["status"] == "failed" and refused["error"]["code"] == "rate_limited"
    assert refused["attempts"] == 0

    await orm(budget_create, scope="agent", agent_name="worker", period="total", limit_usd=Decimal("0"), hard=True)
    key = await orm(make_key)
    over = await poll(Api(key), (await queue(Api(key), {"message": "three [tokens:1]"})).json()["id"])
    assert over["status"] == "failed" and over["error"]["code"] == "budget_exceeded"
    assert fake_upstream.stats()["requests"] == 1  # neither refused run called the model
    codes = await orm(lambda: sorted(DeadLetter.objects.values_list("error_code", flat=True)))
    assert codes == ["budget_exceeded", "rate_limited"]
    assert await orm(AuditLog.objects.filter(action="request.refused").count) == 2


async def test_a_key_revoked_while_its_run_waited_fails_the_run(agent, make_key, no_worker, fake_upstream):
    secret = await orm(make_key)
    api = Api(secret)
    run = (await queue(api, {"message": "later [tokens:1]"})).json()
    key = await orm(lambda: ApiKey.objects.get(runs__id=run["id"]))
    await orm(api_key_revoke, api_key=key)

    assert await run_execute(uuid.UUID(run["id"])) == "failed: api_key_inactive"
    stored = await orm(Run.objects.get, pk=run["id"])
    assert (stored.status, stored.error_code) == ("failed", "api_key_inactive")
    assert fake_upstream.stats()["requests"] == 0
    assert await orm(DeadLetter.objects.filter(run_id=run["id"], error_code="api_key_inactive").exists)


# --- redelivery ---------------------------------------------------------------------------------------


def _as_if_its_worker_died(run_id: str, *, attempts: int = 1) -> None:
    """The row a worker killed mid-run leaves: running, its lease run out, a checkpoint."""
    Run.objects.filter(pk=run_id).update(
        status=Run.Status.RUNNING, attempts=attempts, started_at=timezone.now() - timedelta(minutes=2),
        lease_expires_at=timezone.now() - timedelta(seconds=1),
        metadata={"checkpoint": {"prompt_tokens": 12}})


async def test_redelivered_tasks_do_nothing_to_ended_or_live_runs_and_take_over_dead_ones(
        agent, make_key, no_worker, fake_upstream):
    api = Api(await orm(make_key))
    run = (await queue(api, {"message": "again [tokens:2]"})).json()
    run_id = uuid.UUID(run["id"])

    # Running elsewhere, its lease live: left alone.
    await orm(Run.objects.filter(pk=run_id).update, status=Run.Status.RUNNING,
              lease_expires_at=timezone.now() + timedelta(minutes=1))
    assert await run_execute(run_id) == "running elsewhere (its lease is live)"

    # Its worker died: the redelivery settles that attempt and runs it again, to the end.
    await orm(_as_if_its_worker_died, run["id"])
    assert await run_execute(run_id) == "succeeded"
    done = (await api.get(f"/api/v1/runs/{run_id}")).json()
    assert done["status"] == "succeeded" and done["output"] == "w1 w2" and done["attempts"] == 2
    records = await orm(lambda: list(UsageRecord.objects.filter(run_id=run_id).order_by("id")))
    assert [(r.estimated, r.starts_run) for r in records] == [(True, True), (False, False)]
    assert await orm(AuditLog.objects.filter(action="run.requeued", target=f"run:{run_id}").count) == 1

    # Delivered once more after it ended: nothing.
    assert await run_execute(run_id) == "ended already (succeeded)"
    assert fake_upstream.stats()["requests"] == 1


async def test_the_sweeper_queues_a_dead_workers_run_again_until_its_attempts_run_out(
        agent, make_key, no_worker, runs_settings, fake_upstream):
    runs_settings.RUN_MAX_ATTEMPTS = 2
    api = Api(await orm(make_key))
    again = (await queue(api, {"message": "resumed [tokens:1]"})).json()
    lost = (await queue(api, {"message": "lost"})).json()
    await orm(_as_if_its_worker_died, again["id"], attempts=1)
    await orm(_as_if_its_worker_died, lost["id"], attempts=2)
    celery_app.conf.task_always_eager = True  # the sweeper's enqueue runs it here

    assert await orm(sweep_interrupted_runs) == 2
    assert (await poll(api, again["id"]))["status"] == "succeeded"
    ended = (await api.get(f"/api/v1/runs/{lost['id']}")).json()
    assert ended["status"] == "interrupted" and ended["error"]["code"] == "interrupted"
    [letter] = await orm(lambda: list(DeadLetter.objects.all()))
    assert (str(letter.run_id), letter.error_code, letter.attempts) == (lost["id"], "interrupted", 2)


async def test_runs_whose_enqueue_was_lost_are_enqueued_again(agent, make_key, no_worker, runs_settings):
    api = Api(await orm(make_key))
    run = (await queue(api, {"message": "lost enqueue [tokens:1]"})).json()
    celery_app.control.purge()  # the broker lost it
    celery_app.conf.task_always_eager = True

    assert await orm(runs_requeue_lost) == 0  # not waiting long enough yet
    await orm(Run.objects.filter(pk=run["id"]).update,
              enqueued_at=timezone.now() - timedelta(seconds=runs_settings.RUN_REQUEUE_AFTER_SECONDS + 1))
    assert await orm(runs_requeue_lost) == 1
    assert (await poll(api, run["id"]))["status"] == "succeeded"


# --- real Celery workers (production lane) --------------------------------------------------------


@pytest.fixture
def celery_workers(tmp_path, runs_settings, fake_upstream):
    """start() a `celery worker` subprocess consuming the queue this process publishes async runs
    to, against the test database and the fake upstream; yields start. Workers are stopped (or
    were killed) afterwards and the queue is purged."""
    from test_celery_worker import PLATFORM_VARS, _broker_url, _redis_or_skip, _worker_database_url

    if not (celery_app.conf.broker_url or "").startswith("redis"):
        pytest.skip("real workers need this process to publish async runs to Redis: set REDIS_URL")
    broker = _broker_url()
    redis_client = _redis_or_skip(broker)
    celery_app.conf.task_always_eager = False
    queue_name = celery_app.conf.task_default_queue
    celery_app.control.purge()
    env = {k: v for k, v in os.environ.items() if k not in PLATFORM_VARS}
    env.update(DJANGO_SETTINGS_MODULE="agentplatform.settings", DATABASE_URL=_worker_database_url(),
               REDIS_URL=broker, CELERY_BROKER_URL=broker, CELERY_TASK_ALWAYS_EAGER="false",
               CELERY_TASK_DEFAULT_QUEUE=queue_name, OPENAI_API_KEY="sk-test", OPENAI_BASE_URL=fake_upstream.base_url,
               RUN_CALLBACK_SECRET=SECRET, RUN_CALLBACK_RETRY_BACKOFF_SECONDS="0.2",
               HTTP_FETCH_ALLOW_PRIVATE_NETWORKS="127.0.0.1", RUN_LEASE_SECONDS="3", RUN_CHECKPOINT_SECONDS="1",
               RUN_CANCEL_POLL_SECONDS="0.2", CELERY_BROKER_VISIBILITY_TIMEOUT="4", RUN_SWEEP_ON_START="0",
               LOG_LEVEL="INFO", VAR_DIR=str(tmp_path))
    if not env.get("SECRET_KEY"):
        env["DEBUG"] = "1"
    processes: list[subprocess.Popen] = []

    def start(name: str, pool: str = "solo") -> tuple[subprocess.Popen, object]:
        log_path = tmp_path / f"{name}.log"
        concurrency = ["--concurrency", "2"] if pool == "prefork" else []
        with open(log_path, "wb") as log:
            process = subprocess.Popen(
                [sys.executable, "-m", "celery", "-A", "agentplatform", "worker", "--pool", pool, *concurrency,
                 "--loglevel",
                 "INFO", "--without-gossip", "--without-mingle", "--without-heartbeat", "-Q", queue_name,
                 "--hostname", f"{name}-{uuid.uuid4().hex[:8]}@%h"],
                cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        processes.append(process)
        deadline = time.monotonic() + 60
        while b" ready." not in log_path.read_bytes():
            assert process.poll() is None, f"the worker exited:\n{log_path.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"the worker did not start:\n{log_path.read_text()[-3000:]}"
            time.sleep(0.1)
        return process, log_path

    try:
        yield start
    finally:
        stop_processes([p for p in processes if p.poll() is None])
        celery_app.control.purge()
        redis_client.close()


@pytest.mark.slow
@pytest.mark.redis
async def test_a_real_worker_executes_an_async_run_and_delivers_its_callback(
        agent, make_key, celery_workers, hooks, fake_upstream):
    hook = hooks(200)
    # The pool `celery worker` uses by default (docker-compose's): tasks run in forked children.
    _, log_path = await asyncio.to_thread(celery_workers, "worker", "prefork")
    api = Api(await orm(make_key))

    run = (await queue(api, {"message": "From a worker [tokens:3]", "callback_url": hook.url})).json()
    other = (await queue(api, {"message": "And another [tokens:1]"})).json()
    assert run["status"] == "queued"
    done = await poll(api, run["id"], timeout=45)

    assert done["status"] == "succeeded", (done, log_path.read_text()[-3000:])
    assert done["output"] == "w1 w2 w3" and done["attempts"] == 1 and Decimal(done["cost_usd"]) > 0
    assert (await poll(api, other["id"], timeout=30))["output"] == "w1"
    await orm(wait_until, lambda: Run.objects.filter(pk=run["id"], callback_status="sent").exists(), 30,
              what=f"the callback; worker log:\n{log_path.read_text()[-3000:]}")
    [received] = hook.received
    assert signed(received) and json.loads(received["body"])["output"] == "w1 w2 w3"
    log = log_path.read_text()
    assert "agents.tasks.execute_run_task" in log and "agents.tasks.deliver_run_callback_task" in log


@pytest.mark.slow
@pytest.mark.redis
async def test_a_run_whose_worker_is_killed_is_redelivered_and_completes_once(
        agent, make_key, celery_workers, fake_upstream):
    first, first_log = await asyncio.to_thread(celery_workers, "doomed")
    api = Api(await orm(make_key))
    run = (await queue(api, {"message": "Outlive me [latency:4000] [tokens:2]"})).json()
    await poll(api, run["id"], until=("running",), timeout=30)
    await asyncio.sleep(1.5)  # its lease renewed at least once, the model call in flight

    first.send_signal(signal.SIGKILL)  # no warm shutdown: the task is neither acknowledged nor given back
    await asyncio.to_thread(first.wait, 10)
    assert (await api.get(f"/api/v1/runs/{run['id']}")).json()["status"] == "running"
    # The broker hands the unacknowledged task to the next worker once its visibility timeout (4 s)
    # is over; that worker finds the run's lease (3 s) run out and takes the run over.
    await asyncio.sleep(4.5)
    _, second_log = await asyncio.to_thread(celery_workers, "heir")
    done = await poll(api, run["id"], timeout=60)

    assert done["status"] == "succeeded", (done, second_log.read_text()[-3000:])
    assert done["output"] == "w1 w2" and done["attempts"] == 2
    assert fake_upstream.stats()["requests"] == 2  # the call the dead worker made, and the one that answered
    records = await orm(lambda: list(UsageRecord.objects.filter(run_id=run["id"]).order_by("id")))
    assert [(r.estimated, r.starts_run) for r in records] == [(True, True), (False, False)]
    assert await orm(AuditLog.objects.filter(action="run.requeued", target=f"run:{run['id']}").count) == 1
    assert await orm(AuditLog.objects.filter(action="request.served", details__run_id=run["id"]).count) == 1
    assert not await orm(DeadLetter.objects.exists)

"""Crash safety (agents.recovery): a run is a `running` row from its start, with its budget
reservation and a lease its worker renews; a run whose worker died is ended `interrupted` by the
sweeper, its reservation settled to the checkpointed estimate and the rest released, for every
budget period including `total`. The in-process beat runs the whole schedule on the embedded
default. The end-to-end test kills a real daphne process with SIGKILL mid-stream."""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import signal
import subprocess
import sys
import time
from datetime import timedelta
from decimal import Decimal

import httpx
import pytest
from django.db import connection
from django.utils import timezone

from agentplatform.scheduler import InProcessBeat
from agents.models import Run
from agents.recovery import leases, sweep_interrupted_runs
from billing.budgets import budget_create
from billing.models import BudgetSpend, ModelPrice, UsageRecord
from conftest import ROOT, Api, orm, spawn_daphne, stop_processes, wait_ready
from governance.models import AuditLog

pytestmark = pytest.mark.django_db(transaction=True)

CHAT = "/api/v1/agents/{}/chat"
MODEL = "openai/recovery-model"


def set_price(model: str = MODEL) -> None:
    ModelPrice.objects.create(model=model, input_per_1m=Decimal("1"), output_per_1m=Decimal("2"),
                              effective_from=timezone.now() - timedelta(days=1))


def spend_of(budget_id: int) -> BudgetSpend:
    return BudgetSpend.objects.get(budget_id=budget_id)


class AsgiStream:
    """POST to the real ASGI app and read the SSE events as they are sent (httpx's ASGI transport
    would collect the body whole)."""

    def __init__(self, path: str, body: dict, key: str) -> None:
        self.path, self.raw, self.key = path, json.dumps(body).encode(), key
        self.chunks: asyncio.Queue = asyncio.Queue()
        self.buffer, self.events, self.status = "", [], None

    async def __aenter__(self):
        from agentplatform.asgi import application

        scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
                 "scheme": "http", "path": self.path, "raw_path": self.path.encode(), "query_string": b"",
                 "root_path": "", "client": ("127.0.0.1", 50000), "server": ("testserver", 80),
                 "headers": [(b"host", b"testserver"), (b"content-type", b"application/json"),
                             (b"authorization", f"Bearer {self.key}".encode()),
                             (b"content-length", str(len(self.raw)).encode())]}
        self.done = asyncio.Event()
        sent = False

        async def receive() -> dict:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": self.raw, "more_body": False}
            await self.done.wait()
            return {"type": "http.disconnect"}

        async def send(message: dict) -> None:
            if message["type"] == "http.response.start":
                self.status = message["status"]
            elif message["type"] == "http.response.body":
                await self.chunks.put(message.get("body", b""))
                if not message.get("more_body"):
                    await self.chunks.put(None)

        self.task = asyncio.ensure_future(application(scope, receive, send))
        return self

    async def __aexit__(self, *exc) -> None:
        self.done.set()
        await asyncio.wait_for(self.task, timeout=15)

    async def until(self, predicate) -> list[dict]:
        while not predicate(self.events):
            chunk = await asyncio.wait_for(self.chunks.get(), timeout=15)
            if chunk is None:
                break
            self.buffer += chunk.decode()
            while "\n\n" in self.buffer:
                block, self.buffer = self.buffer.split("\n\n", 1)
                data = "".join(line[5:].strip() for line in block.splitlines() if line.startswith("data:"))
                if data:
                    self.events.append(json.loads(data))
        return self.events


def deltas(n: int):
    return lambda events: sum(e.get("type") == "delta" for e in events) >= n


def ended(events) -> bool:
    return any(e.get("type") in ("done", "error") for e in events)


@pytest.fixture
def fast_leases(settings):
    settings.RUN_LEASE_SECONDS = 3
    settings.RUN_CHECKPOINT_SECONDS = 0.2
    yield settings
    leases._wake.set()


# --- a run exists from its start -------------------------------------------------------------


async def test_a_streaming_run_is_recorded_running_with_its_reservation_before_it_ends(
        make_agent, make_key, openai_settings, fake_upstream, fast_leases):
    await orm(set_price)
    await orm(make_agent, name="slow", model=MODEL, max_tokens=500)
    key = await orm(make_key)
    budget = await orm(budget_create, scope="global", period="total", limit_usd=Decimal("5"))

    body = {"message": "[tokens:200] [gap:25] go", "stream": True}
    async with AsgiStream(CHAT.format("slow"), body, key) as stream:
        await stream.until(deltas(10))
        assert stream.status == 200
        for _ in range(100):  # the lease thread's first renewal (every 0.2 s here) checkpoints it
            read_at = timezone.now()
            mid = await orm(lambda: list(Run.objects.values("status", "lease_expires_at", "reservation", "metadata")))
            if mid[0]["metadata"]["checkpoint"].get("calls"):
                break
            await asyncio.sleep(0.05)
        spend_mid = await orm(spend_of, budget.id)
        rest = await stream.until(ended)

    assert len(mid) == 1 and mid[0]["status"] == "running"
    assert mid[0]["lease_expires_at"] > read_at
    assert Decimal(mid[0]["reservation"]["amount"]) == spend_mid.reserved_usd > 0
    # The lease was renewed with a checkpoint of what was streamed so far (every 0.2 s here).
    checkpoint = mid[0]["metadata"]["checkpoint"]
    assert checkpoint["calls"] and checkpoint["calls"][0]["completion_tokens"] > 0
    assert rest[-1]["type"] == "done"
    final = await orm(lambda: Run.objects.get())
    assert final.status == "succeeded" and final.lease_expires_at is None and final.reservation == {}
    spend = await orm(spend_of, budget.id)
    assert spend.reserved_usd == 0 and spend.spent_usd > 0


async def test_a_refused_turn_records_no_run(make_agent, make_key, openai_settings):
    await orm(set_price)
    await orm(make_agent, name="slow", model=MODEL, max_tokens=500)
    key = await orm(make_key)
    await orm(budget_create, scope="global", period="total", limit_usd=Decimal("0.000001"))

    response = await Api(key).post(CHAT.format("slow"), {"message": "hello"})

    assert response.status_code == 402
    assert await orm(lambda: Run.objects.count()) == 0


# --- the sweeper -----------------------------------------------------------------------------


def _orphan_run(agent, *, lease_ago: float, budget=None, checkpoint: dict | None = None) -> Run:
    """A run as a worker that died leaves it: running, its lease in the past, its reservation held."""
    from billing.budgets import budget_reserve

    reservation = {}
    if budget is not None:
        held = budget_reserve(key_id=None, agent_id=agent.id, amount=Decimal("0.5"))
        reservation = {"spend_ids": list(held.spend_ids), "amount": str(held.amount)}
    now = timezone.now()
    return Run.objects.create(agent=agent, status="running", transport="sse", model=agent.model,
                              started_at=now - timedelta(seconds=30), request_id="req-orphan",
                              lease_expires_at=now - timedelta(seconds=lease_ago), reservation=reservation,
                              metadata={"checkpoint": checkpoint or {"prompt_tokens": 40}})


def test_the_sweeper_ends_an_orphaned_run_and_settles_a_total_budget(make_agent):
    set_price()
    agent = make_agent(name="slow", model=MODEL)
    budget = budget_create(scope="global", period="total", limit_usd=Decimal("5"))
    checkpoint = {"prompt_tokens": 40, "calls": [
        {"model": MODEL, "prompt_tokens": 40, "cached_prompt_tokens": 0, "completion_tokens": 300,
         "cost_usd": "0.00064000", "estimated": True, "priced": True}]}
    run = _orphan_run(agent, lease_ago=1, budget=budget, checkpoint=checkpoint)
    live = _orphan_run(agent, lease_ago=-60)  # a live worker's run: lease still valid
    assert spend_of(budget.id).reserved_usd == Decimal("0.5")

    assert sweep_interrupted_runs() == 1
    assert sweep_interrupted_runs() == 0  # idempotent

    run.refresh_from_db()
    assert (run.status, run.error_code) == ("interrupted", "interrupted")
    assert (run.prompt_tokens, run.completion_tokens, run.reservation, run.lease_expires_at) == (40, 300, {}, None)
    spend = spend_of(budget.id)
    assert (spend.reserved_usd, spend.spent_usd) == (Decimal("0"), Decimal("0.00064"))
    usage = UsageRecord.objects.get(run=run)
    assert (usage.completion_tokens, usage.estimated, usage.starts_run, usage.cost_usd) == \
        (300, True, True, Decimal("0.00064"))
    entry = AuditLog.objects.get(action="run.interrupted")
    assert entry.target == f"run:{run.id}" and entry.outcome == "error"
    assert entry.details["released_usd"] == "0.49936000"
    live.refresh_from_db()
    assert live.status == "running"


def test_a_run_that_died_before_its_first_checkpoint_is_charged_its_prompt(make_agent):
    set_price()
    agent = make_agent(name="slow", model=MODEL)
    run = _orphan_run(agent, lease_ago=1)

    assert sweep_interrupted_runs() == 1

    usage = UsageRecord.objects.get(run=run)
    assert (usage.model, usage.prompt_tokens, usage.completion_tokens, usage.estimated) == (MODEL, 40, 0, True)
    assert usage.cost_usd == Decimal("0.00004")


async def test_a_run_swept_while_its_worker_lived_is_not_stored_or_settled_twice(
        make_agent, make_key, openai_settings, fake_upstream, fast_leases):
    """A worker stalled past its lease: the sweeper ends the run; when the worker comes back and
    finishes, it neither overwrites the run nor settles the reservation a second time."""
    await orm(set_price)
    await orm(make_agent, name="slow", model=MODEL, max_tokens=500)
    key = await orm(make_key)
    budget = await orm(budget_create, scope="global", period="total", limit_usd=Decimal("5"))
    fast_leases.RUN_CHECKPOINT_SECONDS = 30  # no renewal during this test

    body = {"message": "[tokens:40] [gap:20] go", "stream": True}
    async with AsgiStream(CHAT.format("slow"), body, key) as stream:
        await stream.until(deltas(5))
        await orm(lambda: Run.objects.update(lease_expires_at=timezone.now() - timedelta(seconds=1)))
        assert await orm(sweep_interrupted_runs) == 1
        events = await stream.until(ended)

    assert events[-1]["type"] == "done"  # the client got its answer all the same
    run = await orm(lambda: Run.objects.get())
    assert run.status == "interrupted"
    spend = await orm(spend_of, budget.id)
    records = await orm(lambda: list(UsageRecord.objects.values_list("cost_usd", flat=True)))
    assert len(records) == 1  # only the sweeper's estimate
    assert spend.reserved_usd == 0 and spend.spent_usd == records[0]


# --- the in-process beat ----------------------------------------------------------------------


def test_the_inprocess_beat_runs_due_tasks_and_not_others(make_agent):
    set_price()
    agent = make_agent(name="slow", model=MODEL)
    run = _orphan_run(agent, lease_ago=1)
    beat = InProcessBeat({
        "sweep": {"task": "agents.tasks.sweep_interrupted_runs_task", "schedule": 0.05},
        "rollover-hourly": {"task": "billing.tasks.budget_period_rollover_task",
                            "schedule": __import__("celery.schedules").schedules.crontab(minute=0)},
    }, now=timezone.now() - timedelta(seconds=1))
    beat.entries[1]["last_run_at"] = timezone.now()  # just ran: not due for up to an hour

    wait = beat.tick()

    run.refresh_from_db()
    assert run.status == "interrupted"
    assert [e["runs"] for e in beat.entries] == [1, 0]
    assert 0 < wait <= 0.05


def test_every_beat_task_is_registered():
    from django.conf import settings

    from agentplatform.celery import app

    app.loader.import_default_modules()
    missing = [e["task"] for e in settings.CELERY_BEAT_SCHEDULE.values() if e["task"] not in app.tasks]
    assert missing == []


# --- kill -9 of a real server mid-stream -------------------------------------------------------

SETUP = """
import json, sys
from datetime import timedelta
from decimal import Decimal
import django
django.setup()
from django.core.management import call_command
from django.utils import timezone
call_command("migrate", verbosity=0)
from agents.models import Agent
from billing.budgets import budget_create
from billing.models import ModelPrice
from governance.services import api_key_create
Agent.objects.create(name="slow", model="openai/recovery-model", max_tokens=800)
ModelPrice.objects.create(model="openai/recovery-model", input_per_1m=Decimal("1"), output_per_1m=Decimal("2"),
                          effective_from=timezone.now() - timedelta(days=1))
budget = budget_create(scope="global", period="total", limit_usd=Decimal("10"))
_, key = api_key_create(name="kill", role="client")
print(json.dumps({"key": key, "budget": budget.id}))
"""

INSPECT = """
import json, sys
import django
django.setup()
from django.db.models import Sum
from agents.models import Run
from billing.models import BudgetSpend, UsageRecord
from governance.models import AuditLog
spend = BudgetSpend.objects.filter(budget_id=int(sys.argv[1])).first()
print(json.dumps({
    "runs": sorted(Run.objects.values_list("status", flat=True)),
    "reserved": str(spend.reserved_usd), "spent": str(spend.spent_usd),
    "usage": [[u.completion_tokens, str(u.cost_usd), u.estimated, u.starts_run] for u in UsageRecord.objects.all()],
    "usage_cost": str(UsageRecord.objects.aggregate(s=Sum("cost_usd"))["s"] or 0),
    "audits": AuditLog.objects.filter(action="run.interrupted").count(),
}))
"""


def _server_env(tmp_path, fake_upstream) -> dict:
    from test_ratelimit import _worker_database_url

    env = {k: v for k, v in os.environ.items()
           if k not in ("DATABASE_URL", "REDIS_URL", "CACHE_URL", "CELERY_BROKER_URL", "CELERY_TASK_ALWAYS_EAGER",
                        "TEST_DATABASE_NAME", "METRICS_TOKEN", "ALLOW_INSECURE_SECRET_KEY", "READ_DOT_ENV")}
    env.update(DJANGO_SETTINGS_MODULE="agentplatform.settings", DEBUG="0", SECRET_KEY=secrets.token_urlsafe(50),
               VAR_DIR=str(tmp_path), OPENAI_API_KEY="sk-test", OPENAI_BASE_URL=fake_upstream.base_url,
               LOG_LEVEL="WARNING", RUN_LEASE_SECONDS="3", RUN_CHECKPOINT_SECONDS="0.5",
               RUN_SWEEP_ON_START="0", INPROCESS_BEAT="0")
    database_url = _worker_database_url()
    if database_url:
        env["DATABASE_URL"] = database_url
        from django.conf import settings

        if settings.REDIS_URL:
            env["REDIS_URL"] = settings.REDIS_URL
    return env


def _python(env: dict, code: str, *args: str) -> dict:
    done = subprocess.run([sys.executable, "-c", code, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_kill_9_mid_stream_leaves_no_run_unrecorded_and_no_budget_held(tmp_path, fake_upstream):
    if connection.vendor == "postgresql" and os.environ.get("DATABASE_URL", "").startswith("postgres"):
        pass  # the servers share pytest's test database
    env = _server_env(tmp_path, fake_upstream)
    setup = _python(env, SETUP)
    streams, received = 6, []

    log_a = tmp_path / "daphne-a.log"
    server_a, url_a = spawn_daphne(env, log_a)
    processes = [server_a]
    try:
        wait_ready(server_a, url_a, log_a, time.monotonic() + 30)

        async def stream_until_killed(n: int) -> int:
            words = 0
            try:
                async with httpx.AsyncClient(timeout=30) as client:
                    async with client.stream("POST", f"{url_a}{CHAT.format('slow')}",
                                             json={"message": f"[tokens:400] [gap:15] stream {n}", "stream": True},
                                             headers={"Authorization": f"Bearer {setup['key']}"}) as response:
                        assert response.status_code == 200
                        async for line in response.aiter_lines():
                            if line.startswith("data:") and '"delta"' in line:
                                words += 1
            except httpx.HTTPError:
                pass  # the server died under us
            return words

        async def scenario() -> list[int]:
            tasks = [asyncio.ensure_future(stream_until_killed(n)) for n in range(streams)]
            await asyncio.sleep(2.0)  # about 130 words each, several checkpoints
            mid = _python(env, INSPECT, str(setup["budget"]))
            assert mid["runs"] == ["running"] * streams and Decimal(mid["reserved"]) > 0, mid
            server_a.send_signal(signal.SIGKILL)
            return await asyncio.gather(*tasks)

        received = asyncio.run(scenario())
        server_a.wait(timeout=10)
        dead = _python(env, INSPECT, str(setup["budget"]))
        assert dead["runs"] == ["running"] * streams and dead["usage"] == []

        # A new process starts: its start-up sweep (and then its in-process beat) ends the runs
        # once their lease has run out.
        env_b = {**env, "RUN_SWEEP_ON_START": "1", "INPROCESS_BEAT": "1", "RUN_SWEEP_SECONDS": "1"}
        log_b = tmp_path / "daphne-b.log"
        server_b, url_b = spawn_daphne(env_b, log_b)
        processes.append(server_b)
        wait_ready(server_b, url_b, log_b, time.monotonic() + 30)
        deadline = time.monotonic() + 20
        while True:
            after = _python(env, INSPECT, str(setup["budget"]))
            if after["runs"] == ["interrupted"] * streams or time.monotonic() > deadline:
                break
            time.sleep(0.5)
    finally:
        stop_processes(processes)

    assert after["runs"] == ["interrupted"] * streams, (after, log_b.read_text()[-2000:])
    assert Decimal(after["reserved"]) == 0
    assert Decimal(after["spent"]) == Decimal(after["usage_cost"]) > 0
    assert after["audits"] == streams
    metered = sorted(u[0] for u in after["usage"])
    assert len(metered) == streams and all(u[2] and u[3] for u in after["usage"])
    # Each stream's metered completion is its last checkpoint (every 0.5 s): what reached the
    # client, less at most the last half second of words (15 ms apart, ~1.25 tokens each).
    assert all(m > 0 for m in metered)
    assert sum(metered) >= 0.5 * sum(received), (metered, received)
    print(f"\nkill -9 with {streams} streams in flight: client received {sum(received)} deltas; "
          f"runs {after['runs'].count('interrupted')}/{streams} interrupted; metered completion tokens "
          f"{sum(metered)}; spent {after['spent']} USD; reserved left {after['reserved']} USD")


async def test_a_run_that_could_not_be_stored_is_swept_without_settling_twice(
        make_agent, make_key, openai_settings, fake_upstream, settings):
    """Its final write failed: its worker released the reservation itself (and took it off the
    run row), the row stays running; the sweeper ends it later and settles nothing again."""
    settings.AGENT_PIPELINE_STAGES = [*settings.AGENT_PIPELINE_STAGES, "test_audit.BrokenPersistStage"]
    await orm(set_price)
    await orm(make_agent, name="slow", model=MODEL, max_tokens=500)
    key = await orm(make_key)
    budget = await orm(budget_create, scope="global", period="total", limit_usd=Decimal("5"))

    response = await Api(key).post(CHAT.format("slow"), {"message": "hello"})

    assert response.status_code == 500 and response.json()["error"]["code"] == "run_not_stored"
    run = await orm(lambda: Run.objects.get())
    assert (run.status, run.reservation) == ("running", {})
    settled = await orm(spend_of, budget.id)
    assert settled.reserved_usd == 0 and settled.spent_usd > 0
    await orm(lambda: Run.objects.update(lease_expires_at=timezone.now() - timedelta(seconds=1)))

    assert await orm(sweep_interrupted_runs) == 1

    after = await orm(spend_of, budget.id)
    assert (after.reserved_usd, after.spent_usd) == (0, settled.spent_usd)
    assert (await orm(lambda: Run.objects.get())).status == "interrupted"

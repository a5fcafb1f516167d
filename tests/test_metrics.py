"""Prometheus metrics (agentplatform.metrics): the values /metrics reports after real requests
through the ASGI app, and the sums of two real daphne workers sharing a PROMETHEUS_MULTIPROC_DIR.

The in-process registry is shared by every test of the session: tests compare a family's value
before and after what they do, with labels that are theirs alone (an agent made for the test)."""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import subprocess
import sys
import time
from decimal import Decimal

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from conftest import ROOT, Api, assert_error, free_port, orm, parse_sse, spawn_daphne, stop_processes, wait_ready

pytestmark = pytest.mark.django_db(transaction=True)


def parse(text: str) -> dict[tuple[str, frozenset], float]:
    """Every sample of a scrape: (name, labels) → value."""
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(samples: dict, name: str, **labels) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


async def scrape(admin: str) -> dict:
    response = await Api(admin).get("/metrics")
    assert response.status_code == 200, response.text[:300]
    assert response.headers["content-type"].startswith("text/plain")
    return parse(response.text)


@pytest.fixture
def admin(make_key) -> str:
    return make_key(role="admin")


@pytest.fixture
def priced(db):
    """local/demo at $2 / $8 per 1M tokens from a second ago (the migrations' seeded price rows
    do not survive the flush between transactional tests)."""
    from datetime import timedelta

    from django.utils import timezone

    from billing.models import ModelPrice

    ModelPrice.objects.create(model="local/demo", input_per_1m=Decimal("2"), output_per_1m=Decimal("8"),
                              effective_from=timezone.now() - timedelta(seconds=1), source="test")


async def test_it_counts_turns_latency_tokens_and_cost_per_agent(make_agent, make_key, admin, priced):
    await orm(make_agent, name="metered", skills=["calculator"])
    key = await orm(make_key)
    before = await scrape(admin)

    answers = [await Api(key).post("/api/v1/agents/metered/chat", {"message": f"What is {n} * 3?"}) for n in range(3)]
    streamed = await Api(key).post("/api/v1/agents/metered/chat", {"message": "hello", "stream": True})

    after = await scrape(admin)
    assert [a.status_code for a in answers] == [200] * 3 and streamed.status_code == 200
    labels = {"agent": "metered", "status": "succeeded", "variant": ""}
    assert value(after, "agent_requests_total", transport="rest", **labels) - \
        value(before, "agent_requests_total", transport="rest", **labels) == 3
    assert value(after, "agent_requests_total", transport="sse", **labels) - \
        value(before, "agent_requests_total", transport="sse", **labels) == 1
    assert value(after, "agent_request_latency_seconds_count", agent="metered", transport="rest") - \
        value(before, "agent_request_latency_seconds_count", agent="metered", transport="rest") == 3
    latency = value(after, "agent_request_latency_seconds_sum", agent="metered", transport="rest") - \
        value(before, "agent_request_latency_seconds_sum", agent="metered", transport="rest")
    assert latency == pytest.approx(sum(a.json()["latency_ms"] for a in answers) / 1000, abs=0.01)

    done = [e["data"] for e in parse_sse(streamed.text) if e.get("event") == "done"][0]
    bodies = [a.json() for a in answers] + [done]
    for kind, field in (("prompt", "prompt_tokens"), ("completion", "completion_tokens")):
        counted = value(after, "llm_tokens_total", agent="metered", model="local/demo", kind=kind) - \
            value(before, "llm_tokens_total", agent="metered", model="local/demo", kind=kind)
        assert counted == sum(b["usage"][field] for b in bodies) > 0
    cost = value(after, "llm_cost_usd_total", agent="metered", model="local/demo") - \
        value(before, "llm_cost_usd_total", agent="metered", model="local/demo")
    assert cost == pytest.approx(float(sum(Decimal(b["cost_usd"]) for b in bodies)), rel=1e-6)
    assert cost > 0  # local/demo's demo price
    # The calculator turns called the model twice each (tool call, then the answer).
    calls = value(after, "llm_calls_total", model="local/demo", outcome="ok") - \
        value(before, "llm_calls_total", model="local/demo", outcome="ok")
    assert calls >= 3 * 2 + 1
    first_tokens = value(after, "llm_time_to_first_token_seconds_count", agent="metered", model="local/demo") - \
        value(before, "llm_time_to_first_token_seconds_count", agent="metered", model="local/demo")
    assert first_tokens == calls
    assert value(after, "active_streams", transport="sse") == 0  # the stream ended


async def test_it_counts_refusals_by_rate_limit_and_budget(make_agent, make_key, admin, priced):
    await orm(make_agent, name="limited", rate_limit_rpm=1)
    await orm(make_agent, name="broke")
    from billing.budgets import budget_create

    await orm(budget_create, scope="agent", agent_name="broke", period="month", limit_usd=Decimal("0"), hard=True)
    key = await orm(make_key)
    before = await scrape(admin)

    assert (await Api(key).post("/api/v1/agents/limited/chat", {"message": "one"})).status_code == 200
    assert_error(await Api(key).post("/api/v1/agents/limited/chat", {"message": "two"}), 429, "rate_limited")
    assert_error(await Api(key).post("/v1/chat/completions", {"model": "broke", "messages": [
        {"role": "user", "content": "hi"}]}), 402, "budget_exceeded")

    after = await scrape(admin)
    assert value(after, "rate_limited_total", scope="agent") - value(before, "rate_limited_total", scope="agent") == 1
    assert value(after, "budget_blocked_total") - value(before, "budget_blocked_total") == 1
    refused = {"status": "refused", "variant": ""}
    assert value(after, "agent_requests_total", agent="limited", transport="rest", **refused) - \
        value(before, "agent_requests_total", agent="limited", transport="rest", **refused) == 1
    assert value(after, "agent_requests_total", agent="broke", transport="openai", **refused) - \
        value(before, "agent_requests_total", agent="broke", transport="openai", **refused) == 1


async def test_it_reports_a_budgets_spent_ratio_at_settlement(make_agent, make_key, admin, priced):
    await orm(make_agent, name="spender")
    from billing.budgets import budget_create

    budget = await orm(budget_create, scope="agent", agent_name="spender", period="total", limit_usd=Decimal("1"),
                       hard=False)
    key = await orm(make_key)

    answer = (await Api(key).post("/api/v1/agents/spender/chat", {"message": "spend a little"})).json()

    after = await scrape(admin)
    assert value(after, "budget_spent_ratio", budget=str(budget.id)) == pytest.approx(float(answer["cost_usd"]))


async def test_it_counts_idempotent_replays(make_agent, make_key, admin):
    await orm(make_agent, name="once")
    key = await orm(make_key)
    before = await scrape(admin)
    headers = {"Idempotency-Key": "metrics-replay-1"}

    first = await Api(key).post("/api/v1/agents/once/chat", {"message": "hi"}, headers=headers)
    again = await Api(key).post("/api/v1/agents/once/chat", {"message": "hi"}, headers=headers)

    after = await scrape(admin)
    assert again.headers["Idempotent-Replayed"] == "true" and again.json() == first.json()
    assert value(after, "idempotent_replays_total") - value(before, "idempotent_replays_total") == 1
    labels = {"agent": "once", "transport": "rest", "status": "succeeded", "variant": ""}
    assert value(after, "agent_requests_total", **labels) - value(before, "agent_requests_total", **labels) == 1


async def test_it_counts_failed_calls_and_shows_the_open_circuit(make_agent, make_key, admin, openai_settings):
    openai_settings.CIRCUIT_FAILURE_THRESHOLD = 1
    openai_settings.LLM_MAX_RETRIES = 0
    await orm(make_agent, name="flaky", model="openai/metrics-fault-500")
    key = await orm(make_key)
    before = await scrape(admin)

    assert_error(await Api(key).post("/api/v1/agents/flaky/chat", {"message": "hi"}), 502)
    assert_error(await Api(key).post("/api/v1/agents/flaky/chat", {"message": "hi"}), 503, "circuit_open")

    after = await scrape(admin)
    model = "openai/metrics-fault-500"
    assert value(after, "llm_calls_total", model=model, outcome="upstream_error") - \
        value(before, "llm_calls_total", model=model, outcome="upstream_error") == 1
    assert value(after, "llm_calls_total", model=model, outcome="circuit_open") - \
        value(before, "llm_calls_total", model=model, outcome="circuit_open") == 1
    assert value(after, "circuit_state", provider="openai", model="metrics-fault-500") == 2
    failed = {"agent": "flaky", "transport": "rest", "status": "failed", "variant": ""}
    assert value(after, "agent_requests_total", **failed) - value(before, "agent_requests_total", **failed) == 2


async def test_it_counts_an_sse_stream_while_it_is_sent(make_agent, make_key, admin, openai_settings):
    """Driven on the raw ASGI app (httpx's ASGI transport reads a body whole): /metrics is read when
    the stream's first bytes go out, and again after its end."""
    from agentplatform.asgi import application

    await orm(make_agent, name="slow", model="openai/gpt-4o-mini")
    key = await orm(make_key)
    body = json.dumps({"message": "[tokens:3] [gap:300]", "stream": True}).encode()
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": "/api/v1/agents/slow/chat", "raw_path": b"/api/v1/agents/slow/chat", "query_string": b"",
             "root_path": "", "client": ("127.0.0.1", 50000), "server": ("testserver", 80),
             "headers": [(b"host", b"testserver"), (b"content-type", b"application/json"),
                         (b"authorization", f"Bearer {key}".encode()), (b"content-length", str(len(body)).encode())]}
    sent = asyncio.Event()
    during: list[dict] = []

    async def receive() -> dict:
        if not sent.is_set():
            sent.set()
            return {"type": "http.request", "body": body, "more_body": False}
        await asyncio.Event().wait()  # the client stays

    async def send(message: dict) -> None:
        if message["type"] == "http.response.body" and message.get("body") and not during:
            during.append(await scrape(admin))

    await asyncio.wait_for(application(scope, receive, send), timeout=20)
    after = await scrape(admin)

    assert value(during[0], "active_streams", transport="sse") >= 1
    assert value(after, "active_streams", transport="sse") == value(during[0], "active_streams", transport="sse") - 1


def test_it_counts_celery_tasks_with_their_duration():
    from agentplatform.metrics import metrics_text
    from governance.tasks import idempotency_records_purge_task

    name = "governance.tasks.idempotency_records_purge_task"
    before = parse(metrics_text().decode())
    idempotency_records_purge_task.apply()  # run here, as a worker runs it (signals included)
    after = parse(metrics_text().decode())

    assert value(after, "celery_tasks_total", task=name, state="success") - \
        value(before, "celery_tasks_total", task=name, state="success") == 1
    assert value(after, "celery_task_duration_seconds_count", task=name) - \
        value(before, "celery_task_duration_seconds_count", task=name) == 1


# --- two worker processes ------------------------------------------------------------------

SETUP = """
import io, json
import django
django.setup()
from django.core.management import call_command
call_command("migrate", verbosity=0)
from agents.models import Agent
Agent.objects.create(name="counted", model="local/demo")
out = io.StringIO()
call_command("create_api_key", name="metrics", role="admin", json=True, stdout=out)
print(out.getvalue().strip().splitlines()[-1])
"""


@pytest.mark.slow
def test_two_workers_report_the_hosts_sums(tmp_path):
    """Two daphne processes sharing a database and a PROMETHEUS_MULTIPROC_DIR: N turns split between
    them are N in the /metrics of either, and on the shared METRICS_PORT."""
    multiproc = tmp_path / "prometheus"
    multiproc.mkdir()
    metrics_port = free_port()
    env = {k: v for k, v in os.environ.items()
           if k not in ("DATABASE_URL", "REDIS_URL", "CACHE_URL", "CELERY_BROKER_URL", "CELERY_TASK_ALWAYS_EAGER",
                        "TEST_DATABASE_NAME", "METRICS_TOKEN", "ALLOW_INSECURE_SECRET_KEY", "READ_DOT_ENV",
                        "OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")}
    env.update(DJANGO_SETTINGS_MODULE="agentplatform.settings", DEBUG="0", SECRET_KEY=secrets.token_urlsafe(50),
               VAR_DIR=str(tmp_path), LOG_LEVEL="WARNING", PROMETHEUS_MULTIPROC_DIR=str(multiproc),
               METRICS_PORT=str(metrics_port), METRICS_TOKEN="scrape-token")
    setup = subprocess.run([sys.executable, "-c", SETUP], cwd=ROOT, env=env, capture_output=True, text=True,
                           timeout=120)
    assert setup.returncode == 0, setup.stderr
    admin = json.loads(setup.stdout.strip().splitlines()[-1])["key"]
    servers = [spawn_daphne(env, tmp_path / f"daphne-{n}.log") for n in range(2)]
    processes = [p for p, _ in servers]
    try:
        deadline = time.monotonic() + 60
        for n, (process, url) in enumerate(servers):
            wait_ready(process, url, tmp_path / f"daphne-{n}.log", deadline)
        urls = [url for _, url in servers]
        total = 10

        async def send_all() -> list[int]:
            async with httpx.AsyncClient(timeout=30, headers={"Authorization": f"Bearer {admin}"}) as client:
                answers = await asyncio.gather(*(
                    client.post(f"{urls[n % 2]}/api/v1/agents/counted/chat", json={"message": f"turn {n}"})
                    for n in range(total)))
            return [a.status_code for a in answers]

        assert asyncio.run(send_all()) == [200] * total
        labels = {"agent": "counted", "transport": "rest", "status": "succeeded", "variant": ""}
        for url in urls:  # either worker answers for the host
            scraped = httpx.get(f"{url}/metrics", headers={"Authorization": "Bearer scrape-token"}, timeout=10)
            assert scraped.status_code == 200
            samples = parse(scraped.text)
            assert value(samples, "agent_requests_total", **labels) == total
            assert value(samples, "agent_request_latency_seconds_count", agent="counted", transport="rest") == total
            assert value(samples, "llm_calls_total", model="local/demo", outcome="ok") == total
            # django-prometheus' families are summed too: both workers' chat POSTs.
            assert sum(v for (name, lbls), v in samples.items()
                       if name == "django_http_responses_total_by_status_view_method_total"
                       and dict(lbls).get("view") == "agent-chat") == total
        # The private port: no credentials, the same figures.
        open_scrape = parse(httpx.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).text)
        assert value(open_scrape, "agent_requests_total", **labels) == total
        assert sorted(os.listdir(multiproc))  # the processes' files
    finally:
        stop_processes(processes)
    # A worker that exits takes its live gauges (streams in flight) with it.
    assert not [f for f in os.listdir(multiproc) if f.startswith("gauge_livesum_")]


async def test_the_dashboard_charts_only_metrics_the_platform_exports(make_agent, make_key, admin):
    """deploy/grafana/dashboards/agentplatform.json: each metric its queries name is in a scrape
    (after a turn, a refusal and a task: the families with labels appear once used)."""
    import re

    await orm(make_agent, name="charted", rate_limit_rpm=1)
    key = await orm(make_key)
    await Api(key).post("/api/v1/agents/charted/chat", {"message": "one"})
    await Api(key).post("/api/v1/agents/charted/chat", {"message": "two"})
    scraped = {name for name, _ in await scrape(admin)}
    dashboard = json.loads((ROOT / "deploy" / "grafana" / "dashboards" / "agentplatform.json").read_text())
    queries = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    named = set(re.findall(r"\b((?:agent|llm|rate|budget|circuit|active|idempotent|celery|django)_[a-z_]+)\b",
                           " ".join(queries)))
    # Families that only appear once something happened in this process: checked by name.
    from agentplatform import metrics

    defined = {m._name for m in vars(metrics).values() if hasattr(m, "_name") and hasattr(m, "_type")}
    unknown = {n for n in named
               if n not in scraped and re.sub(r"_(bucket|total|count|sum)$", "", n) not in defined}
    assert not unknown, f"the dashboard names metrics nobody exports: {sorted(unknown)}"
    assert {"agent_requests_total", "agent_request_latency_seconds_bucket", "llm_tokens_total",
            "llm_cost_usd_total", "rate_limited_total", "budget_blocked_total", "budget_spent_ratio",
            "circuit_state", "active_streams"} <= named

#!/usr/bin/env python
"""Fault injection from outside: N mixed requests, a share of them with upstream faults, over two
platform worker processes on PostgreSQL + Redis; then the books are checked against the
upstream's own counts.

    .venv/bin/python bench/fault_bench.py [--requests 1000] [--fault-share 0.2] [--concurrency 20]
        [--database-url postgres://postgres@127.0.0.1:5432/ap_faultbench] [--redis-url redis://127.0.0.1:6379/8]
        [--seed 1]

It (re)creates the database, migrates it, makes the agents and a key, starts the fake OpenAI
upstream (agentplatform/testing/fake_openai.py) and two daphne workers, and sends the requests
alternately to the workers, over the three HTTP transports (REST JSON, SSE, /v1 with and without
stream). Faults, by the fake upstream's directives (unique message per request):

    429-once     [fault:429] [fault-times:1] [retry-after-ms:200]  -> a retry that waits, then answers
    500-once     [fault:500] [fault-times:1]                       -> a retry answers
    500-always   [fault:500]: every attempt on every model fails   -> 502, a clean JSON error
    400          [fault:400]: the request's fault, never retried    -> 4xx JSON error
    hang         [fault:hang] under a 3 s agent deadline            -> 504 timeout
    cut          [fault:cut]: the upstream stream breaks            -> error event upstream_stream_cut
    fallback     the agent whose primary model always fails (fault-500 in its name): the fallback
                 answers; its circuit opens after CIRCUIT_FAILURE_THRESHOLD and is skipped then

Checks (printed, and the exit status): no 500 and no response that is not JSON / a well-formed
stream; every failure a JSON error (or an `error` event / error chunk on streams); every request
a run in the database, one `request.served` audit entry per run, the audit chain intact; one
usage record per upstream call (the upstream's /_stats count), none for calls skipped by an open
circuit; no budget reservation left open.
The last line of stdout is a JSON summary.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import random
import secrets
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import httpx

ROOT = Path(__file__).resolve().parent.parent
PYTHON = sys.executable

SETUP = """
import json, sys
from decimal import Decimal
import django
django.setup()
from django.core.management import call_command
call_command("migrate", verbosity=0)
from agents.models import Agent
from billing.budgets import budget_create
from governance.services import api_key_create
Agent.objects.create(name="main", model="openai/fb-primary", fallback_models=["openai/fb-secondary"],
                     timeout_seconds=3, max_tokens=64)
Agent.objects.create(name="fallbacky", model="openai/fault-500-primary", fallback_models=["openai/fb-secondary"],
                     timeout_seconds=3, max_tokens=64)
budget_create(scope="global", period="total", limit_usd=Decimal("1000"))
_, key = api_key_create(name="fault-bench", role="client")
print(json.dumps({"key": key}))
"""

BOOKS = """
import json
import django
django.setup()
from collections import Counter
from django.db.models import Sum
from agents.models import Run
from billing.models import BudgetSpend, UsageRecord
from governance.audit import audit_chain_verify
from governance.models import AuditLog
runs = Counter(Run.objects.values_list("status", flat=True))
codes = Counter(Run.objects.exclude(error_code="").values_list("error_code", flat=True))
report = audit_chain_verify()
print(json.dumps({
    "runs": sum(runs.values()), "run_statuses": dict(runs), "run_error_codes": dict(codes),
    "usage_records": UsageRecord.objects.count(),
    "usage_by_model": dict(Counter(UsageRecord.objects.values_list("model", flat=True))),
    "estimated_records": UsageRecord.objects.filter(estimated=True).count(),
    "served_audits": AuditLog.objects.filter(action="request.served").count(),
    "audit_chain_ok": report.ok,
    "reserved_usd": str(BudgetSpend.objects.aggregate(s=Sum("reserved_usd"))["s"] or 0),
    "spent_usd": str(BudgetSpend.objects.aggregate(s=Sum("spent_usd"))["s"] or 0),
    "usage_cost_usd": str(UsageRecord.objects.aggregate(s=Sum("cost_usd"))["s"] or 0),
}))
"""

FAULTS = {
    "429-once": "[fault:429] [fault-times:1] [retry-after-ms:200]",
    "500-once": "[fault:500] [fault-times:1]",
    "500-always": "[fault:500]",
    "400": "[fault:400]",
    "hang": "[fault:hang]",
    "cut": "[fault:cut]",
    "fallback": "",
}
TRANSPORTS = ["rest", "sse", "openai", "openai-stream"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def recreate_database(url: str) -> None:
    import psycopg

    name = urlsplit(url).path.lstrip("/")
    admin = urlunsplit(urlsplit(url)._replace(path="/postgres"))
    with psycopg.connect(admin, autocommit=True) as db:
        db.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        db.execute(f'CREATE DATABASE "{name}"')


def flush_redis(url: str) -> None:
    import redis

    redis.Redis.from_url(url).flushdb()


def classify(transport: str, status: int, body: str) -> tuple[str, str]:
    """(outcome, code): outcome ok | error (a clean JSON error or error event) | broken."""
    if transport in ("rest", "openai") or status != 200:
        try:
            data = json.loads(body)
        except ValueError:
            return "broken", f"not JSON ({status})"
        if status == 200:
            ok = "output" in data if transport == "rest" else bool(data.get("choices"))
            return ("ok", "") if ok else ("broken", "200 without an answer")
        error = data.get("error") if isinstance(data, dict) else None
        if isinstance(error, dict) and error.get("code"):
            return ("broken" if status >= 500 and status not in (502, 503, 504) else "error"), str(error["code"])
        return "broken", f"{status} without error.code"
    events = []
    for block in body.split("\n\n"):
        data = "".join(line[5:].strip() for line in block.splitlines() if line.startswith("data:"))
        if data:
            events.append(data)
    if not events:
        return "broken", "empty stream"
    if transport == "sse":
        last = json.loads(events[-1])
        if last.get("type") == "done":
            return "ok", ""
        if last.get("type") == "error" and last.get("code") and last.get("status"):
            return "error", last["code"]
        return "broken", f"stream ended with {last.get('type')}"
    # /v1 stream: [DONE] after a finish chunk, or an error object (then [DONE]) the openai SDK raises.
    errors = [json.loads(e)["error"] for e in events if e != "[DONE]" and "error" in json.loads(e)]
    if errors:
        ok = isinstance(errors[-1], dict) and errors[-1].get("code") and errors[-1].get("status")
        return ("error", errors[-1]["code"]) if ok else ("broken", "malformed error chunk")
    if events[-1] == "[DONE]":
        finishes = [json.loads(e)["choices"][0].get("finish_reason") for e in events[:-1]
                    if e != "[DONE]" and json.loads(e).get("choices")]
        return ("ok", "") if finishes and finishes[-1] else ("broken", "[DONE] without a finish reason")
    last = json.loads(events[-1])
    if isinstance(last.get("error"), dict) and last["error"].get("code"):
        return "error", last["error"]["code"]
    return "broken", "stream ended without [DONE] or error"


async def one(client: httpx.AsyncClient, url: str, key: str, transport: str, agent: str, message: str) -> dict:
    headers = {"Authorization": f"Bearer {key}"}
    if transport in ("rest", "sse"):
        path, body = f"/api/v1/agents/{agent}/chat", {"message": message, "stream": transport == "sse"}
    else:
        path = "/v1/chat/completions"
        body = {"model": agent, "messages": [{"role": "user", "content": message}],
                "stream": transport == "openai-stream"}
    started = time.perf_counter()
    try:
        response = await client.post(url + path, json=body, headers=headers)
        status, text = response.status_code, response.text
    except httpx.HTTPError as exc:
        status, text = 0, f"{type(exc).__name__}: {exc}"
    outcome, code = classify(transport, status, text) if status else ("broken", text[:200])
    return {"status": status, "outcome": outcome, "code": code, "seconds": time.perf_counter() - started}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--fault-share", type=float, default=0.2)
    parser.add_argument("--concurrency", type=int, default=20)
    parser.add_argument("--database-url", default="postgres://postgres@127.0.0.1:5432/ap_faultbench")
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/8")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)

    recreate_database(args.database_url)
    flush_redis(args.redis_url)
    work = Path(tempfile.mkdtemp(prefix="fault-bench-"))
    processes: list[subprocess.Popen] = []
    upstream_port = free_port()
    processes.append(subprocess.Popen([PYTHON, str(ROOT / "agentplatform/testing/fake_openai.py"),
                                       "--port", str(upstream_port)], stdout=subprocess.DEVNULL,
                                      stderr=open(work / "upstream.log", "wb")))
    upstream = f"http://127.0.0.1:{upstream_port}"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DATABASE_", "REDIS_", "CELERY_"))}
    env.update(DJANGO_SETTINGS_MODULE="agentplatform.settings", DEBUG="0", SECRET_KEY=secrets.token_urlsafe(50),
               VAR_DIR=str(work), OPENAI_API_KEY="sk-bench", OPENAI_BASE_URL=upstream + "/v1",
               DATABASE_URL=args.database_url, REDIS_URL=args.redis_url, LOG_LEVEL="ERROR",
               LLM_RETRY_BASE_SECONDS="0.05", LLM_RETRY_MAX_WAIT_SECONDS="2", CIRCUIT_FAILURE_THRESHOLD="5",
               CELERY_TASK_ALWAYS_EAGER="1", INPROCESS_BEAT="0")
    try:
        setup = subprocess.run([PYTHON, "-c", SETUP], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        if setup.returncode:
            print(setup.stderr[-3000:], file=sys.stderr)
            return 2
        key = json.loads(setup.stdout.strip().splitlines()[-1])["key"]
        urls = []
        for n in range(2):
            port = free_port()
            processes.append(subprocess.Popen(
                [PYTHON, "-m", "daphne", "-b", "127.0.0.1", "-p", str(port), "agentplatform.asgi:application"],
                cwd=ROOT, env=env, stdout=open(work / f"daphne-{n}.log", "wb"), stderr=subprocess.STDOUT))
            urls.append(f"http://127.0.0.1:{port}")
        deadline = time.monotonic() + 60
        for url in urls:
            while True:
                try:
                    if httpx.get(url + "/health", timeout=1).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if time.monotonic() > deadline:
                    print("the workers did not start", file=sys.stderr)
                    return 2
                time.sleep(0.2)
        httpx.post(upstream + "/_reset")

        rng = random.Random(args.seed)
        plan = []
        for i in range(args.requests):
            transport = TRANSPORTS[i % len(TRANSPORTS)]
            fault = rng.choice(list(FAULTS)) if rng.random() < args.fault_share else "none"
            agent = "fallbacky" if fault == "fallback" else "main"
            message = f"{FAULTS.get(fault, '')} request {i} [tokens:{rng.randint(5, 40)}]".strip()
            plan.append((i, transport, fault, agent, message))

        async def run_all() -> list[dict]:
            limits = httpx.Limits(max_connections=args.concurrency * 2)
            async with httpx.AsyncClient(timeout=30, limits=limits) as client:
                gate = asyncio.Semaphore(args.concurrency)

                async def go(item):
                    i, transport, fault, agent, message = item
                    async with gate:
                        result = await one(client, urls[i % 2], key, transport, agent, message)
                    return {**result, "transport": transport, "fault": fault}

                return await asyncio.gather(*(go(item) for item in plan))

        started = time.monotonic()
        results = asyncio.run(run_all())
        elapsed = time.monotonic() - started
        time.sleep(1.0)  # the last group commits
        upstream_stats = httpx.get(upstream + "/_stats").json()
        books_run = subprocess.run([PYTHON, "-c", BOOKS], cwd=ROOT, env=env, capture_output=True, text=True,
                                   timeout=300)
        if books_run.returncode:
            print(books_run.stderr[-3000:], file=sys.stderr)
            return 2
        books = json.loads(books_run.stdout.strip().splitlines()[-1])
        logs = "".join((work / f"daphne-{n}.log").read_text(errors="replace") for n in range(2))
    finally:
        for p in processes:
            p.terminate()
        for p in processes:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()

    by_fault: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for r in results:
        by_fault[r["fault"]][f"{r['outcome']}:{r['code']}" if r["code"] else r["outcome"]] += 1
    statuses = collections.Counter(r["status"] for r in results)
    broken = [r for r in results if r["outcome"] == "broken"]
    ok = sum(r["outcome"] == "ok" for r in results)
    recovered = sum(r["outcome"] == "ok" for r in results if r["fault"] in ("429-once", "500-once", "fallback"))
    faulted = sum(r["fault"] != "none" for r in results)
    print(f"{args.requests} requests ({faulted} with injected faults) over 2 workers in {elapsed:.1f} s, "
          f"concurrency {args.concurrency}")
    print(f"HTTP statuses: {dict(sorted(statuses.items()))}")
    for fault, outcomes in sorted(by_fault.items()):
        print(f"  {fault:<11} {dict(outcomes)}")
    checks = {
        "no_500": statuses.get(500, 0) == 0,
        "no_broken_responses": not broken,
        "a_run_per_request": books["runs"] == args.requests,
        "an_audit_entry_per_run": books["served_audits"] == books["runs"],
        "audit_chain_ok": books["audit_chain_ok"],
        "a_usage_record_per_upstream_call": books["usage_records"] == upstream_stats["requests"],
        "no_reservation_left": float(books["reserved_usd"]) == 0,
        "spent_equals_metered": books["spent_usd"] == books["usage_cost_usd"],
        "no_tracebacks_in_logs": "Traceback" not in logs,
    }
    print(f"succeeded {ok} ({recovered} of them through a retry or a fallback); upstream calls "
          f"{upstream_stats['requests']}, usage records {books['usage_records']} "
          f"({books['estimated_records']} estimated); runs {books['runs']} {books['run_statuses']}; "
          f"error codes {books['run_error_codes']}; audit entries {books['served_audits']}")
    print(f"spent {books['spent_usd']} USD = metered {books['usage_cost_usd']} USD; reserved left {books['reserved_usd']}")
    for name, passed in checks.items():
        print(f"  {'PASS' if passed else 'FAIL'} {name}")
    if broken:
        print("broken responses (first 5):", broken[:5])
    summary = {"requests": args.requests, "faulted": faulted, "succeeded": ok, "recovered": recovered,
               "statuses": {str(k): v for k, v in statuses.items()},
               "by_fault": {k: dict(v) for k, v in by_fault.items()}, "upstream_calls": upstream_stats["requests"],
               "books": books, "checks": checks, "seconds": round(elapsed, 1)}
    print(json.dumps(summary))
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python
"""Persistence throughput on PostgreSQL with 1, 2 and 4 worker processes: does the audit chain
serialize the workers' run writes?

    .venv/bin/python bench/audit_bench.py [--workers 1,2,4] [--seconds 5] [--rounds 1]
        [--concurrency 32] [--modes audited,unaudited] [--database-url URL] [--keep-database]

Each worker is a process with Django set up on the platform's settings (DATABASE_URL: a
throwaway PostgreSQL database, created and migrated here) that stores runs the way the chat path
does: `--concurrency` asyncio tasks each awaiting `agentplatform.db.write_db(job)` in a loop, so
the process's one writer thread group-commits whatever is queued (each job in its savepoint).
A job is one run's rows:

    audited     Run row + its "request.served" entry through governance.audit.audit_record
    unaudited   the Run row alone (the floor: what the database and the group commit cost)

One `manage.py audit_sequencer` process runs beside the workers, as scripts/prod.sh runs it
(on PostgreSQL entries are chained off the request path); after each audited case the bench
reports how long the sequencer took to catch up ("chain lag": until no entry is unchained).
Workers start together, warm up for `--warmup` seconds, then count jobs committed during
`--seconds`. The figure is runs stored per second, summed over the workers, per mode and worker
count, interleaved over `--rounds` (medians). Scaling = runs/s at N workers / runs/s at 1.
When every audited transaction takes one global lock from its first append to its commit, the
audited figure stays flat as workers are added while the unaudited one grows. After the runs,
the chain is verified (`audit_chain_verify`, with the sequencer run first where there is one),
so a fast but forked chain does not pass.

Do not quote figures from a busy machine: "other load" shows what else used the CPU.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path
from urllib.parse import urlsplit

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

DEFAULT_DATABASE = "postgres://postgres@127.0.0.1:5432/ap_audit_bench"
STRIPPED_ENV = {"DJANGO_SETTINGS_MODULE", "READ_DOT_ENV", "DATABASE_URL", "REDIS_URL", "CACHE_URL",
                "CELERY_BROKER_URL", "CELERY_TASK_ALWAYS_EAGER", "DEBUG", "SECRET_KEY", "VAR_DIR"}


# --------------------------------------------------------------------------- a worker process

def child(args: argparse.Namespace) -> None:
    import django

    django.setup()
    from agents.models import Agent, Run
    from django.utils import timezone

    from agentplatform.db import close_db_threads, write_db
    from governance.audit import audit_record

    agent_id = Agent.objects.get(name="audit-bench").pk
    audited = args.mode == "audited"
    # Ready: the driver answers with the common start time once every worker is.
    print("ready", flush=True)
    start_at = float(sys.stdin.readline())

    def job() -> None:
        now = timezone.now()
        run = Run.objects.create(id=uuid.uuid4(), agent_id=agent_id, status="succeeded", transport="openai",
                                 model="openai/bench-model", prompt_tokens=12, completion_tokens=8, total_tokens=20,
                                 steps=1, latency_ms=3, started_at=now, finished_at=now)
        if audited:
            audit_record(actor="key:bench", action="request.served", target="agent:audit-bench",
                         details={"status": "succeeded", "run_id": str(run.id), "total_tokens": 20},
                         request_id=uuid.uuid4().hex)

    async def main() -> dict:
        counted = 0
        measuring = False

        async def loop(stop_at: float) -> None:
            nonlocal counted
            while time.time() < stop_at:
                await write_db(job)
                if measuring:
                    counted += 1

        while time.time() < start_at:
            await asyncio.sleep(0.005)
        warm_until = start_at + args.warmup
        stop_at = warm_until + args.seconds
        tasks = [asyncio.create_task(loop(stop_at)) for _ in range(args.concurrency)]
        await asyncio.sleep(max(0.0, warm_until - time.time()))
        measuring = True
        cpu0 = time.process_time()
        await asyncio.gather(*tasks)
        return {"jobs": counted, "cpu_s": time.process_time() - cpu0}

    result = asyncio.run(main())
    close_db_threads()
    print(json.dumps(result), flush=True)


# --------------------------------------------------------------------------- the driver

def _machine_busy() -> float:
    with open("/proc/stat") as f:
        values = [int(v) for v in f.readline().split()[1:]]
    idle = values[3] + (values[4] if len(values) > 4 else 0)
    return (sum(values[:8]) - idle) / os.sysconf("SC_CLK_TCK")


WAITS_SQL = """SELECT coalesce(wait_event_type || ':' || wait_event, 'cpu') FROM pg_stat_activity
WHERE datname = current_database() AND pid <> pg_backend_pid() AND state = 'active'
AND backend_type = 'client backend'"""


class WaitSampler:
    """What the workers' PostgreSQL backends are doing, sampled every 20 ms during a case:
    'Lock:advisory' is the chain's lock (or another advisory lock), 'IO:WALSync' the commit's
    fsync, 'cpu' running. Shares of all samples of active backends."""

    def __init__(self, url: str) -> None:
        import threading

        self.url, self.counts, self.stop = url, {}, threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        import psycopg

        with psycopg.connect(self.url.replace("postgres://", "postgresql://", 1), autocommit=True) as conn:
            while not self.stop.wait(0.02):
                for (event,) in conn.execute(WAITS_SQL).fetchall():
                    self.counts[event] = self.counts.get(event, 0) + 1

    def __enter__(self) -> "WaitSampler":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join(5)

    def shares(self) -> dict[str, float]:
        total = sum(self.counts.values()) or 1
        top = sorted(self.counts.items(), key=lambda kv: -kv[1])[:4]
        return {k: round(v / total, 2) for k, v in top}


def run_case(env: dict, mode: str, workers: int, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, __file__, "--child", "--mode", mode,
           "--seconds", str(args.seconds), "--warmup", str(args.warmup), "--concurrency", str(args.concurrency)]
    procs = [subprocess.Popen(cmd, cwd=ROOT, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(workers)]
    for p in procs:  # every worker has imported Django and read the database
        line = p.stdout.readline()
        if line.strip() != "ready":
            raise SystemExit(f"a worker failed to start:\n{line}{p.stderr.read()[-3000:]}")
    start_at = time.time() + 0.2
    for p in procs:
        p.stdin.write(f"{start_at!r}\n")
        p.stdin.flush()
    time.sleep(max(0.0, start_at + args.warmup - time.time()))
    busy0 = _machine_busy()
    with WaitSampler(env["DATABASE_URL"]) as waits:
        time.sleep(args.seconds)
    outs = [p.communicate(timeout=args.warmup + 120) for p in procs]
    busy = _machine_busy() - busy0
    results = []
    for p, (out, err) in zip(procs, outs):
        if p.returncode != 0:
            raise SystemExit(f"a worker failed ({p.returncode}):\n{err[-3000:]}")
        results.append(json.loads(out.strip().splitlines()[-1]))
    jobs = sum(r["jobs"] for r in results)
    cpu = sum(r["cpu_s"] for r in results)
    return {"mode": mode, "workers": workers, "runs_per_s": round(jobs / args.seconds, 1), "jobs": jobs,
            "worker_cpu_ms_per_run": round(cpu * 1000 / max(jobs, 1), 3), "waits": waits.shares(),
            "other_load_cores": round(max(0.0, busy - cpu) / args.seconds, 2)}


PENDING_SQL = "SELECT count(*) FROM governance_auditlog WHERE seq IS NULL"


def chain_lag(url: str, timeout: float = 120.0) -> float | None:
    """Seconds until the sequencer has chained every committed entry (None: no seq column,
    i.e. entries are chained on append)."""
    import psycopg

    t0 = time.monotonic()
    with psycopg.connect(url.replace("postgres://", "postgresql://", 1), autocommit=True) as conn:
        try:
            while conn.execute(PENDING_SQL).fetchone()[0]:
                if time.monotonic() - t0 > timeout:
                    return float("inf")
                time.sleep(0.05)
        except psycopg.errors.UndefinedColumn:
            return None
    return round(time.monotonic() - t0, 2)


def ensure_database(url: str, drop_first: bool) -> None:
    import psycopg
    from psycopg import sql

    parts = urlsplit(url)
    name = parts.path.lstrip("/")
    admin = parts._replace(path="/postgres").geturl().replace(parts.scheme + "://", "postgresql://", 1)
    with psycopg.connect(admin, autocommit=True, connect_timeout=5) as conn:
        if drop_first:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
        if not conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone():
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))


SETUP = """
from agents.models import Agent
Agent.objects.get_or_create(name="audit-bench", defaults={"model": "openai/bench-model"})
"""

VERIFY = """
import json
from governance import audit
sequence = getattr(audit, "audit_chain_sequence_all", None)
if sequence is not None:
    sequence()
report = audit.audit_chain_verify()
print(json.dumps({"ok": report.ok, "count": report.count,
                  "broken": report.broken.message if report.broken else None}))
"""


def manage(env: dict, *args: str) -> str:
    proc = subprocess.run([sys.executable, "manage.py", *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    if proc.returncode != 0:
        raise SystemExit(f"manage.py {args[0]} failed:\n{proc.stderr[-3000:]}")
    return proc.stdout


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", default="1,2,4", help="comma-separated worker process counts")
    parser.add_argument("--modes", default="audited,unaudited")
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--concurrency", type=int, default=32, help="runs in flight per worker")
    parser.add_argument("--database-url", default=DEFAULT_DATABASE)
    parser.add_argument("--keep-database", action="store_true", help="do not drop and recreate it first")
    # The worker side.
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--mode", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(args)
        return 0

    counts = [int(n) for n in args.workers.split(",")]
    modes = args.modes.split(",")
    env = {k: v for k, v in os.environ.items() if k not in STRIPPED_ENV}
    env.update(DJANGO_SETTINGS_MODULE="agentplatform.settings", DATABASE_URL=args.database_url, DEBUG="0",
               ALLOW_INSECURE_SECRET_KEY="true", PYTHONUNBUFFERED="1", LOG_LEVEL="WARNING",
               DATABASE_POOL_MIN_SIZE="1", DATABASE_POOL_MAX_SIZE="4")
    ensure_database(args.database_url, drop_first=not args.keep_database)
    manage(env, "migrate", "--noinput", "-v", "0")
    manage(env, "shell", "-c", SETUP)

    print(f"audit bench: {args.seconds:g}s per case, {args.concurrency} runs in flight per worker, "
          f"{args.rounds} round(s), database {urlsplit(args.database_url).path.lstrip('/')}", flush=True)
    print(f"{'mode':<10} {'workers':>7} {'runs/s':>9} {'cpu ms/run':>10} {'other load':>10}   "
          "database backends: what they wait for (share of samples)", flush=True)
    results: dict[tuple[str, int], list[dict]] = {}
    sequencer = subprocess.Popen([sys.executable, "manage.py", "audit_sequencer"], cwd=ROOT, env=env,
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(args.rounds):
            for workers in counts:
                for mode in modes:  # interleaved: a load spike hits both modes alike
                    r = run_case(env, mode, workers, args)
                    r["chain_lag_s"] = chain_lag(args.database_url) if mode == "audited" else None
                    results.setdefault((mode, workers), []).append(r)
                    lag = "" if r["chain_lag_s"] is None else f"   chain lag {r['chain_lag_s']:.2f}s"
                    waits = " ".join(f"{k} {v:.0%}" for k, v in r["waits"].items())
                    print(f"{mode:<10} {workers:>7} {r['runs_per_s']:>9.1f} {r['worker_cpu_ms_per_run']:>10.3f} "
                          f"{r['other_load_cores']:>10.2f}   {waits}{lag}", flush=True)
    finally:
        sequencer.terminate()
        sequencer.wait(30)

    summary = {}
    for (mode, workers), rs in results.items():
        summary.setdefault(mode, {})[workers] = round(statistics.median(r["runs_per_s"] for r in rs), 1)
    print("\nmedians (runs stored per second, all workers together; scaling vs 1 worker):")
    for mode, by_count in summary.items():
        base = by_count.get(counts[0]) or 1
        cells = ", ".join(f"{n} workers {v:.0f} ({v / base:.2f}x)" for n, v in by_count.items())
        print(f"  {mode:<10} {cells}")
    if "audited" in summary and "unaudited" in summary:
        for n in counts:
            print(f"  audited / unaudited at {n} workers: {summary['audited'][n] / max(summary['unaudited'][n], 0.1):.2f}")

    report = json.loads(manage(env, "shell", "-c", VERIFY).strip().splitlines()[-1])
    print(f"chain after the runs: {'intact' if report['ok'] else 'BROKEN: ' + str(report['broken'])}, "
          f"{report['count']} entries")
    print(json.dumps({"bench": "audit_persistence", "seconds": args.seconds, "concurrency": args.concurrency,
                      "rounds": args.rounds, "runs_per_s": summary, "chain": report}, separators=(",", ":")))
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())

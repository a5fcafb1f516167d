#!/usr/bin/env python
"""What shadow traffic costs the caller: the OpenAI-compatible endpoint at c1 with an experiment
running on the agent, shadow_percent 0 and 100 alternated in the same run (same server, same
upstream, interleaved rounds), on the embedded stack (the shadow runs on the server's own
background loop: the worst case; with Celery workers they leave the process).

    .venv/bin/python bench/experiment_bench.py [--rounds 3] [--seconds 4] [--warmup 200]
    .venv/bin/python bench/experiment_bench.py --database-url postgres://postgres@127.0.0.1:5432/ap_bench \
        --redis-url redis://127.0.0.1:6379/14 [--worker]   # shadows go through the broker (to a Celery worker)

Prints p50/p99 per setting and round, the medians, the added p50, and how many shadow runs the
shadowed rounds stored (each measured request answered twice: once live, once in the shadow).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
import chat_bench as cb  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--warmup", type=int, default=200)
    parser.add_argument("--database-url", default="")
    parser.add_argument("--redis-url", default="")
    parser.add_argument("--worker", action="store_true", help="with --redis-url: start one Celery worker")
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="experiment-bench-"))
    log = tmp / "bench.log"
    procs = cb.Procs()
    rows: dict[int, list[dict]] = {0: [], 100: []}
    try:
        env = cb.bench_env(tmp, database_url=args.database_url, redis_url=args.redis_url)
        fake_url, _fake_port, fake = cb.start_upstream(procs, env, log)
        env["OPENAI_BASE_URL"] = fake_url
        port, key, server = cb.start_platform(procs, env, tmp, log)
        if args.worker and args.redis_url:
            procs.start("worker", [cb.PYTHON, "-m", "celery", "-A", "agentplatform", "worker", "-l", "warning",
                                   "--concurrency", "1", "-P", "solo", "-Q", "celery"], env, tmp / "worker.log")
        admin = json.loads(cb.manage(["create_api_key", "--name", "bench-admin", "--role", "admin", "--json"], env,
                                     log).strip().splitlines()[-1])["key"]
        base = f"http://127.0.0.1:{port}/api/v1/admin/experiments"
        headers = {"Authorization": f"Bearer {admin}"}
        made = httpx.post(base, headers=headers, timeout=30, json={
            "name": "bench-shadow", "agent": cb.AGENT, "status": "running", "shadow_variant": "shadow",
            "shadow_percent": 0,
            "variants": [{"name": "control", "weight": 100, "is_control": True},
                         {"name": "shadow", "weight": 0, "model": "openai/shadow-model"}]})
        made.raise_for_status()
        experiment = made.json()["id"]
        request = cb.build_request("127.0.0.1", port, "/v1/chat/completions", cb.chat_body(cb.AGENT, False), key)
        pids = {"server": server.pid, "upstream": fake.pid}
        with asyncio.Runner(loop_factory=cb._new_loop) as runner:
            for rnd in range(args.rounds):
                for percent in (0, 100):
                    httpx.patch(f"{base}/{experiment}", headers=headers, timeout=30,
                                json={"shadow_percent": percent}).raise_for_status()
                    r = runner.run(cb.run_case("127.0.0.1", port, request, concurrency=1, warmup=args.warmup,
                                               seconds=args.seconds, stream=False, pids=pids))
                    rows[percent].append(r)
                    print(f"round {rnd + 1} shadow {percent:>3} %: p50 {r['p50_ms']:.3f} ms, p99 {r['p99_ms']:.3f} ms,"
                          f" {r['rps']:.1f} req/s, {r['errors']} errors", flush=True)
                    time.sleep(1.0)  # let the shadow backlog drain before the next case
        time.sleep(5.0 if args.worker else 2.0)
        shadow = httpx.get(f"{base}/{experiment}/results", headers=headers, timeout=60).json()["shadow"]
    except cb.SetupError as exc:
        print(f"experiment bench: set-up failed: {exc} (logs: {tmp})", file=sys.stderr)
        return 2
    finally:
        procs.stop_all()
        shutil.rmtree(tmp, ignore_errors=True)
    med = {p: {"p50_ms": statistics.median(r["p50_ms"] for r in rs), "p99_ms": statistics.median(r["p99_ms"] for r in rs),
               "rps": statistics.median(r["rps"] for r in rs)} for p, rs in rows.items()}
    stack = ("postgres" if args.database_url else "sqlite") + ("+redis" if args.redis_url else "") + \
        ("+worker" if args.worker else "")
    summary = {"bench": "experiment_shadow", "stack": stack, "rounds": args.rounds, "median": med,
               "shadow_added_p50_ms": round(med[100]["p50_ms"] - med[0]["p50_ms"], 3),
               "shadow_runs_stored": sum(s["runs"] for s in shadow)}
    print(f"shadow 100 % adds {summary['shadow_added_p50_ms']:.3f} ms p50 at c1 "
          f"({med[0]['p50_ms']:.3f} -> {med[100]['p50_ms']:.3f} ms); {summary['shadow_runs_stored']} shadow runs stored")
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

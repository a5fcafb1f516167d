#!/usr/bin/env python
"""The latency the governance pipeline's rate limits and idempotency add to POST /v1/chat/completions.

    .venv/bin/python bench/governance_bench.py [--seconds 4] [--rounds 2] [--concurrency 16]
        [--database-url URL] [--redis-url URL] [--json-only]

One set-up, one server process, the same run (chat_bench.py's helpers: temp VAR_DIR, the fake
upstream, daphne, the raw asyncio HTTP client). Two keys for the same agent:

    plain       a key without limits, no Idempotency-Key (rate limiting costs nothing)
    governed    a key with rate_limit_rpm and rate_limit_tpm (high enough never to refuse)
                and a fresh Idempotency-Key per request (claim INSERT + stored response)
    limits      the governed key without Idempotency-Key (rate limits alone)
    replay      the governed key repeating one Idempotency-Key: every answer is a replay

Cases run interleaved (plain, governed, limits, replay at c1, then plain and governed at high
concurrency) for --rounds rounds; the summary takes medians. It prints a table and a JSON line
with added_p50_ms_c1 / added_p99_ms_c1 (governed minus plain at c1). Other pipeline stages
(audit, key usage, guards, flags, budgets) run for both keys alike and are not in the delta.
Exit status 0, or 2 when the set-up failed.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import secrets
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import chat_bench as cb  # noqa: E402

LIMITS_SNIPPET = """
from governance.models import ApiKey
from governance.services import split_key
ApiKey.objects.filter(prefix=split_key({key!r})).update(rate_limit_rpm=10_000_000, rate_limit_tpm=2_000_000_000)
"""


def request_bytes(port: int, key: str, idempotency_key: str | None) -> bytes:
    payload = json.dumps(cb.chat_body(cb.AGENT, False), separators=(",", ":")).encode()
    extra = f"Idempotency-Key: {idempotency_key}\r\n" if idempotency_key else ""
    return (f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nAuthorization: Bearer {key}\r\n"
            f"{extra}Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n\r\n").encode() + payload


async def run_case(port: int, make_request, *, concurrency: int, warmup: int, seconds: float) -> dict:
    latencies: list[float] = []
    errors: list[str] = []
    conns = [cb.Conn("127.0.0.1", port) for _ in range(concurrency)]

    async def worker(conn: cb.Conn, budget: list | None, deadline: float | None, record: bool) -> None:
        while True:
            if budget is not None:
                if budget[0] <= 0:
                    return
                budget[0] -= 1
            elif time.perf_counter() >= deadline:
                return
            if conn.writer is None:
                await conn.open()
            request = make_request()
            t0 = time.perf_counter()
            conn.writer.write(request)
            status, body, keep_alive = await cb.read_response(conn.reader, t0)
            elapsed = time.perf_counter() - t0
            if not keep_alive:
                conn.close()
            if status != 200:
                errors.append(f"HTTP {status}: {body[:200].decode(errors='replace')}")
            elif record:
                latencies.append(elapsed)

    try:
        for c in conns:
            await c.open()
        budget = [warmup]
        await asyncio.gather(*(worker(c, budget, None, False) for c in conns))
        t0 = time.perf_counter()
        await asyncio.gather(*(worker(c, None, t0 + seconds, True) for c in conns))
        wall = time.perf_counter() - t0
    finally:
        for c in conns:
            c.close()
    return {"concurrency": concurrency, "requests": len(latencies), "errors": len(errors),
            "error_samples": errors[:3], "rps": round(len(latencies) / wall, 1),
            "p50_ms": round(cb.pct(latencies, 50) * 1000, 3), "p99_ms": round(cb.pct(latencies, 99) * 1000, 3)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--warmup", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--database-url", default="")
    parser.add_argument("--redis-url", default="")
    parser.add_argument("--keep", action="store_true")
    parser.add_argument("--json-only", action="store_true")
    args = parser.parse_args(argv)

    def say(*a) -> None:
        if not args.json_only:
            print(*a, flush=True)

    tmp = Path(tempfile.mkdtemp(prefix="governance-bench-"))
    log = tmp / "bench.log"
    procs = cb.Procs()
    rounds: dict[str, list[dict]] = {}
    try:
        env = {k: v for k, v in os.environ.items() if k not in cb.STRIPPED_ENV}
        env.update(DEBUG="0", SECRET_KEY=secrets.token_urlsafe(50), VAR_DIR=str(tmp), OPENAI_API_KEY="sk-bench",
                   PYTHONUNBUFFERED="1", PYTHONDONTWRITEBYTECODE="1")
        if args.database_url:
            env["DATABASE_URL"] = args.database_url
            cb.ensure_postgres_database(args.database_url)
        if args.redis_url:
            env.update(REDIS_URL=args.redis_url, CACHE_KEY_PREFIX="apgovbench", CHANNEL_LAYER_PREFIX="apgovbench")
        stack = ("postgres" if args.database_url else "sqlite") + ("+redis" if args.redis_url else "")
        say(f"governance bench: daphne (1 process), {stack}, temp dir {tmp}")

        fake = procs.start("upstream", [cb.PYTHON, str(cb.ROOT / "agentplatform/testing/fake_openai.py"),
                                        "--host", "127.0.0.1", "--port", "0"], env, log, pipe_stdout=True)
        env["OPENAI_BASE_URL"] = cb.wait_listening_line(fake, log)
        cb.manage(["migrate", "--noinput", "-v", "0"], env, log)
        cb.manage(["shell", "-c", cb.SETUP_SNIPPET], env, log)
        keys = {}
        for name in ("plain", "governed"):
            out = cb.manage(["create_api_key", "--name", f"bench-{name}", "--role", "client", "--agents", cb.AGENT,
                             "--json"], env, log)
            keys[name] = json.loads(out.strip().splitlines()[-1])["key"]
        cb.manage(["shell", "-c", LIMITS_SNIPPET.format(key=keys["governed"])], env, log)

        port = cb.free_port()
        server_log = tmp / "server.log"
        server = procs.start("server", [cb.PYTHON, "-m", "daphne", "-v", "0", "-b", "127.0.0.1", "-p", str(port),
                                        "agentplatform.asgi:application"], env, server_log)
        cb.wait_http_ok(port, server, server_log)

        counter = itertools.count()
        run = secrets.token_hex(4)
        plain = request_bytes(port, keys["plain"], None)
        limits_only = request_bytes(port, keys["governed"], None)
        replay = request_bytes(port, keys["governed"], f"replay-{run}")
        cases = [
            ("plain c1", 1, lambda: plain),
            ("governed c1", 1, lambda: request_bytes(port, keys["governed"], f"{run}-{next(counter)}")),
            ("limits c1", 1, lambda: limits_only),
            ("replay c1", 1, lambda: replay),
            (f"plain c{args.concurrency}", args.concurrency, lambda: plain),
            (f"governed c{args.concurrency}", args.concurrency,
             lambda: request_bytes(port, keys["governed"], f"{run}-{next(counter)}")),
        ]
        # The limits admit everything: 10M requests/min, 2G tokens/min.
        with asyncio.Runner(loop_factory=cb._new_loop) as runner:
            for rnd in range(args.rounds):
                say(f"\nround {rnd + 1}/{args.rounds}")
                say(f"{'case':<14} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'n':>7} {'errors':>6}")
                for name, conc, make in cases:
                    r = runner.run(run_case(port, make, concurrency=conc, warmup=args.warmup, seconds=args.seconds))
                    rounds.setdefault(name, []).append(r)
                    say(f"{name:<14} {r['rps']:>8.1f} {r['p50_ms']:>8.3f} {r['p99_ms']:>8.3f} {r['requests']:>7} "
                        f"{r['errors']:>6}")
                    for sample in r["error_samples"]:
                        say(f"    error: {sample}")
        if server.poll() is not None:
            raise cb.SetupError(f"the server died during the run:\n{cb.log_tail(server_log)}")
    except cb.SetupError as exc:
        print(f"governance bench: set-up failed: {exc}", file=sys.stderr)
        args.keep = True
        return 2
    finally:
        procs.stop_all()
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)

    summary = {name: {"rps": round(statistics.median(r["rps"] for r in rs), 1),
                      "p50_ms": round(statistics.median(r["p50_ms"] for r in rs), 3),
                      "p99_ms": round(statistics.median(r["p99_ms"] for r in rs), 3),
                      "requests": sum(r["requests"] for r in rs), "errors": sum(r["errors"] for r in rs)}
               for name, rs in rounds.items()}
    hi = f"c{args.concurrency}"
    result = {
        "bench": "governance", "stack": stack, "cpus": os.cpu_count(), "rounds": args.rounds,
        "seconds_per_case": args.seconds, "cases": {k.replace(" ", "_"): v for k, v in summary.items()},
        "added_p50_ms_c1": round(summary["governed c1"]["p50_ms"] - summary["plain c1"]["p50_ms"], 3),
        "added_p99_ms_c1": round(summary["governed c1"]["p99_ms"] - summary["plain c1"]["p99_ms"], 3),
        "added_p50_ms_c1_limits_only": round(summary["limits c1"]["p50_ms"] - summary["plain c1"]["p50_ms"], 3),
        "replay_p50_ms_c1": summary["replay c1"]["p50_ms"],
        f"rps_ratio_{hi}": round(summary[f"governed {hi}"]["rps"] / summary[f"plain {hi}"]["rps"], 3),
        "errors": sum(v["errors"] for v in summary.values()),
    }
    say(f"\nmedians over {args.rounds} rounds: governed adds p50 {result['added_p50_ms_c1']:.3f} ms, "
        f"p99 {result['added_p99_ms_c1']:.3f} ms at c1; a replay answers in p50 {result['replay_p50_ms_c1']:.3f} ms; "
        f"throughput at {hi}: governed/plain = {result[f'rps_ratio_{hi}']:.3f}")
    print(json.dumps(result, separators=(",", ":")), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

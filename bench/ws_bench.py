#!/usr/bin/env python
"""Many concurrent WebSocket chat streams on ONE server process, against the upstream's own figures.

    .venv/bin/python bench/ws_bench.py [--connections 200,500,1000] [--tokens 100] [--gap-ms 10]
        [--ramp 0] [--json-only] [--keep]

Self-contained, like chat_bench.py (whose helpers it reuses): a temporary VAR_DIR with its own
SQLite database, the agent `bench` (model `openai/bench-model`) and a client API key, the fake
OpenAI upstream, and for each connection count a FRESH daphne process (DEBUG off; fresh, so its
peak RSS belongs to that count). Per count N:

  1. warm-up: 10 connections, one short turn each (imports, the provider's HTTP client);
  2. the upstream baseline: N concurrent streaming requests straight to the fake upstream
     (raw HTTP, the same messages and directives), time to the first token;
  3. N WebSocket connections (the `websockets` client, Bearer key, at most 64 handshakes at
     once), each waiting for its `ready` frame;
  4. every connection sends one message `[tokens:N] [gap:MS] ...` — all at once (--ramp 0), or
     spread evenly over --ramp seconds, the baseline likewise — and reads its stream to `done`.

Reported per N: completion rate (turns that ended with `done`, not cancelled, with every token),
time to first token (message sent → first `delta`) p50/p95 for the platform and the upstream
and their difference (the overhead), stream time, handshake time, the server's peak RSS
(VmHWM) and RSS growth per open connection, and the CPU each process (server, upstream, this
client) used. The machine's other load is shown too: the numbers are noisy when it is high.
The last line of stdout is one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import secrets
import shutil
import socket
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

sys.path.insert(0, str(Path(__file__).resolve().parent))
import chat_bench as cb  # noqa: E402  (the sibling benchmark's process and /proc helpers)

ROOT = cb.ROOT
PYTHON = cb.PYTHON
HANDSHAKES_AT_ONCE = 64


def raise_fd_limit(needed: int) -> int:
    """Raise RLIMIT_NOFILE towards the hard limit (inherited by the servers started later)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = hard if hard != resource.RLIM_INFINITY else max(soft, needed)
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def vm_rss_mb(pid: int) -> float | None:
    return cb.proc_status_mb(pid, "VmRSS")


def pct(values: list, q: float) -> float | None:
    return round(cb.pct(values, q) * 1000, 1) if values else None


@dataclass
class Outcome:
    ttft: list = field(default_factory=list)       # seconds, message sent → first token
    total: list = field(default_factory=list)      # seconds, message sent → done
    handshake: list = field(default_factory=list)  # seconds (WebSocket only)
    completed: int = 0
    failed: int = 0
    samples: list = field(default_factory=list)

    def fail(self, what: str) -> None:
        self.failed += 1
        if len(self.samples) < 3:
            self.samples.append(what)


def message(tokens: int, gap_ms: int, i: int) -> str:
    return f"[tokens:{tokens}] [gap:{gap_ms}] stream number {i}"


# --------------------------------------------------------------------------- upstream baseline

async def upstream_stream(port: int, body: bytes, start_at: float, out: Outcome, tokens: int) -> None:
    reader = writer = None
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port, limit=1 << 20)
        writer.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        await asyncio.sleep(max(0.0, start_at - time.perf_counter()))
        t0 = time.perf_counter()
        writer.write(body)
        head = await reader.readuntil(b"\r\n\r\n")
        if head[9:12] != b"200":
            out.fail(head[:60].decode(errors="replace"))
            return
        first = None
        seen = 0
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";", 1)[0], 16)
            if size == 0:
                break
            chunk = await reader.readexactly(size + 2)
            if b'"content":"w' in chunk:
                seen += 1
                if first is None:
                    first = time.perf_counter() - t0
        if seen != tokens or first is None:
            out.fail(f"upstream stream had {seen} tokens")
            return
        out.ttft.append(first)
        out.total.append(time.perf_counter() - t0)
        out.completed += 1
    except (OSError, asyncio.IncompleteReadError, ValueError) as exc:
        out.fail(f"{type(exc).__name__}: {exc}")
    finally:
        if writer is not None:
            writer.close()


async def upstream_case(port: int, n: int, tokens: int, gap_ms: int, ramp: float) -> Outcome:
    out = Outcome()
    bodies = []
    for i in range(n):
        payload = json.dumps({"model": cb.UPSTREAM_MODEL, "stream": True, "stream_options": {"include_usage": True},
                              "messages": [{"role": "user", "content": message(tokens, gap_ms, i)}]}).encode()
        bodies.append((f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
                       f"Authorization: Bearer sk-bench\r\nContent-Type: application/json\r\n"
                       f"Content-Length: {len(payload)}\r\nConnection: close\r\n\r\n").encode() + payload)
    start = time.perf_counter() + 0.5  # connections first, then the same schedule as the platform
    await asyncio.gather(*(upstream_stream(port, bodies[i], start + ramp * i / n, out, tokens) for i in range(n)))
    return out


# --------------------------------------------------------------------------- WebSocket clients

async def ws_client(url: str, key: str, text: str, tokens: int, gate: asyncio.Semaphore, opened: list,
                    go: asyncio.Event, offset: float, out: Outcome, deadline: float) -> None:
    from websockets.asyncio.client import connect
    from websockets.exceptions import WebSocketException

    try:
        async with gate:
            t0 = time.perf_counter()
            ws = await connect(url, additional_headers={"Authorization": f"Bearer {key}"}, proxy=None,
                               compression=None, open_timeout=60, ping_interval=None, max_queue=None)
            ready = await asyncio.wait_for(ws.recv(), 60)
            out.handshake.append(time.perf_counter() - t0)
    except (OSError, asyncio.TimeoutError, WebSocketException) as exc:
        out.fail(f"connect: {type(exc).__name__}: {exc}")
        opened.append(False)
        return
    opened.append(True)
    try:
        if '"ready"' not in ready:
            out.fail(f"no ready frame: {ready[:200]}")
            return
        await go.wait()
        await asyncio.sleep(max(0.0, go.at + offset - time.perf_counter()))
        t0 = time.perf_counter()
        await ws.send(text)
        first = None
        deltas = 0
        async with asyncio.timeout(max(1.0, deadline - time.perf_counter())):
            async for raw in ws:
                if raw.startswith('{"type":"delta"'):
                    deltas += 1
                    if first is None:
                        first = time.perf_counter() - t0
                    continue
                frame = json.loads(raw)
                if frame["type"] == "done":
                    if frame.get("cancelled") or deltas != tokens or first is None:
                        out.fail(f"done after {deltas} deltas (cancelled={frame.get('cancelled')})")
                    else:
                        out.ttft.append(first)
                        out.total.append(time.perf_counter() - t0)
                        out.completed += 1
                    return
                if frame["type"] == "error":
                    out.fail(f"error frame: {raw[:200]}")
                    return
        out.fail("closed before done")
    except (OSError, asyncio.TimeoutError, WebSocketException, ValueError) as exc:
        out.fail(f"{type(exc).__name__}: {exc}")
    finally:
        await ws.close()


async def platform_case(url: str, key: str, n: int, tokens: int, gap_ms: int, ramp: float, pids: dict,
                        rss: dict, timeout: float) -> tuple[Outcome, dict]:
    out = Outcome()
    gate = asyncio.Semaphore(HANDSHAKES_AT_ONCE)
    go = asyncio.Event()
    opened: list = []
    deadline = time.perf_counter() + timeout
    texts = [json.dumps({"type": "message", "content": message(tokens, gap_ms, i)}) for i in range(n)]
    tasks = [asyncio.create_task(ws_client(url, key, texts[i], tokens, gate, opened, go, ramp * i / n, out,
                                           deadline)) for i in range(n)]
    t_open = time.perf_counter()
    while len(opened) < n and time.perf_counter() < deadline:
        await asyncio.sleep(0.05)
    open_s = time.perf_counter() - t_open
    rss["connected"] = vm_rss_mb(pids["server"])
    # The streams: CPU and the machine's load measured from the first message to the last `done`.
    cpu0 = {name: cb._proc_cpu(pid) for name, pid in pids.items()}
    busy0 = cb._machine_busy()
    peak = [rss["connected"] or 0.0]

    async def sample() -> None:
        while True:
            peak.append(vm_rss_mb(pids["server"]) or 0.0)
            await asyncio.sleep(0.1)

    sampler = asyncio.create_task(sample())
    go.at = time.perf_counter()
    go.set()
    await asyncio.gather(*tasks)
    wall = time.perf_counter() - go.at
    sampler.cancel()
    cpu = {name: round(cb._proc_cpu(pid) - cpu0[name], 2) for name, pid in pids.items()}
    other = round(max(0.0, cb._machine_busy() - busy0 - sum(cpu.values())) / wall, 2)
    rss["peak_during_run"] = max(peak)
    return out, {"open_seconds": round(open_s, 2), "stream_wall_seconds": round(wall, 2), "cpu_seconds": cpu,
                 "other_load_cores": other}


# --------------------------------------------------------------------------- one connection count

def start_server(procs: cb.Procs, env: dict, tmp: Path, n: int) -> tuple[int, object, Path]:
    port = cb.free_port()
    log = tmp / f"server-{n}.log"
    server = procs.start(f"server-{n}", [PYTHON, "-m", "daphne", "-v", "0", "-b", "127.0.0.1", "-p", str(port),
                                         "agentplatform.asgi:application"], env, log)
    cb.wait_http_ok(port, server, log)
    return port, server, log


def stop(proc) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except Exception:
            proc.kill()
            proc.wait(timeout=10)


async def warm_up(url: str, key: str) -> None:
    out = Outcome()
    gate, go = asyncio.Semaphore(10), asyncio.Event()
    go.at = time.perf_counter()
    go.set()
    await asyncio.gather(*(ws_client(url, key, json.dumps({"type": "message", "content": "[tokens:5] warm"}), 5,
                                     gate, [], go, 0.0, out, time.perf_counter() + 60) for _ in range(10)))
    if out.completed != 10:
        raise cb.SetupError(f"warm-up failed: {out.samples}")


def run_count(runner: asyncio.Runner, procs: cb.Procs, env: dict, tmp: Path, key: str, fake_pid: int,
              fake_port: int, n: int, args) -> dict:
    port, server, log = start_server(procs, env, tmp, n)
    try:
        url = f"ws://127.0.0.1:{port}/ws/agents/{cb.AGENT}/chat/"
        rss = {"started": vm_rss_mb(server.pid)}
        runner.run(warm_up(url, key))
        rss["warm"] = vm_rss_mb(server.pid)
        upstream = runner.run(upstream_case(fake_port, n, args.tokens, args.gap_ms, args.ramp))
        pids = {"server": server.pid, "upstream": fake_pid, "client": os.getpid()}
        platform, meta = runner.run(platform_case(url, key, n, args.tokens, args.gap_ms, args.ramp, pids, rss,
                                                  args.timeout))
        rss["peak_vmhwm"] = cb.peak_rss_mb(server.pid)
        if server.poll() is not None:
            raise cb.SetupError(f"the server died during the run:\n{cb.log_tail(log)}")
    finally:
        stop(server)
    up50, up95 = pct(upstream.ttft, 50), pct(upstream.ttft, 95)
    pl50, pl95 = pct(platform.ttft, 50), pct(platform.ttft, 95)
    per_conn_kb = None
    if rss.get("connected") and rss.get("warm"):
        per_conn_kb = round((rss["connected"] - rss["warm"]) * 1024 / n, 1)
    return {
        "connections": n,
        "completed": platform.completed,
        "completion_rate": round(platform.completed / n, 4),
        "failed": platform.failed,
        "failure_samples": platform.samples,
        "ttft_ms": {"p50": pl50, "p95": pl95, "max": pct(platform.ttft, 100)},
        "upstream_ttft_ms": {"p50": up50, "p95": up95, "completed": upstream.completed, "failed": upstream.failed},
        "ttft_overhead_ms": {"p50": round(pl50 - up50, 1) if pl50 is not None and up50 is not None else None,
                             "p95": round(pl95 - up95, 1) if pl95 is not None and up95 is not None else None},
        "stream_ms": {"p50": pct(platform.total, 50), "p95": pct(platform.total, 95)},
        "upstream_stream_ms": {"p50": pct(upstream.total, 50), "p95": pct(upstream.total, 95)},
        "handshake_ms": {"p50": pct(platform.handshake, 50), "p95": pct(platform.handshake, 95)},
        "frames_per_second": round(platform.completed * (args.tokens + 3) / meta["stream_wall_seconds"])
        if meta["stream_wall_seconds"] else None,
        "server_rss_mb": rss,
        "rss_per_open_connection_kb": per_conn_kb,
        **meta,
    }


def fmt(r: dict) -> str:
    t, u, o = r["ttft_ms"], r["upstream_ttft_ms"], r["ttft_overhead_ms"]
    return (f"{r['connections']:>6} {r['completion_rate'] * 100:>8.1f}% {t['p50']!s:>8} {t['p95']!s:>8} "
            f"{u['p50']!s:>7} {u['p95']!s:>7} {o['p50']!s:>8} {o['p95']!s:>8} {r['stream_ms']['p50']!s:>8} "
            f"{r['stream_ms']['p95']!s:>8} {r['server_rss_mb']['peak_vmhwm']!s:>8} "
            f"{r['cpu_seconds']['server']:>6} {r['cpu_seconds']['upstream']:>6} {r['cpu_seconds']['client']:>6} "
            f"{r['other_load_cores']:>5}")


HEADER = (f"{'conns':>6} {'complete':>9} {'ttft p50':>8} {'p95':>8} {'up p50':>7} {'up p95':>7} {'+p50 ms':>8} "
          f"{'+p95 ms':>8} {'strm p50':>8} {'p95':>8} {'RSS MB':>8} {'cpu s: srv':>6} {'upstr':>6} {'client':>6} "
          f"{'other':>5}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--connections", default="200,500,1000", help="comma-separated counts (default 200,500,1000)")
    parser.add_argument("--tokens", type=int, default=100, help="tokens per stream (default 100)")
    parser.add_argument("--gap-ms", type=int, default=10, help="the upstream's gap between tokens (default 10)")
    parser.add_argument("--ramp", type=float, default=0.0,
                        help="spread the messages evenly over this many seconds (default 0: all at once)")
    parser.add_argument("--timeout", type=float, default=300.0, help="per count, for everything (default 300 s)")
    parser.add_argument("--keep", action="store_true", help="keep the temp dir (logs, SQLite DB)")
    parser.add_argument("--json-only", action="store_true", help="print only the final JSON line")
    args = parser.parse_args(argv)
    counts = [int(c) for c in args.connections.split(",") if c.strip()]
    if not counts or min(counts) < 1 or args.tokens < 1 or args.gap_ms < 0 or args.ramp < 0:
        parser.error("--connections must be positive integers, --tokens >= 1, --gap-ms and --ramp >= 0")

    def say(*a) -> None:
        if not args.json_only:
            print(*a, flush=True)

    fds = raise_fd_limit(2 * max(counts) + 256)
    if fds < 2 * max(counts) + 256:
        say(f"warning: RLIMIT_NOFILE is {fds}: too low for {max(counts)} connections (client and server ends)")
    tmp = Path(tempfile.mkdtemp(prefix="ws-bench-"))
    log = tmp / "bench.log"
    procs = cb.Procs()
    results = []
    try:
        env = {k: v for k, v in os.environ.items() if k not in cb.STRIPPED_ENV}
        env.update(DEBUG="0", SECRET_KEY=secrets.token_urlsafe(50), VAR_DIR=str(tmp), OPENAI_API_KEY="sk-bench",
                   PYTHONUNBUFFERED="1", PYTHONDONTWRITEBYTECODE="1", LOG_LEVEL="WARNING")
        say(f"ws bench: 1 daphne process per count, SQLite, {os.cpu_count()} CPUs, RLIMIT_NOFILE {fds}, "
            f"{args.tokens} tokens x {args.gap_ms} ms per stream, ramp {args.ramp:g} s, temp dir {tmp}")
        fake = procs.start("upstream", [PYTHON, str(ROOT / "agentplatform/testing/fake_openai.py"),
                                        "--host", "127.0.0.1", "--port", "0"], env, log, pipe_stdout=True)
        fake_url = cb.wait_listening_line(fake, log)
        env["OPENAI_BASE_URL"] = fake_url
        say("migrating, creating the agent and the API key ...")
        cb.manage(["migrate", "--noinput", "-v", "0"], env, log)
        cb.manage(["shell", "-c", cb.SETUP_SNIPPET], env, log)
        out = cb.manage(["create_api_key", "--name", "bench", "--role", "client", "--agents", cb.AGENT, "--json"],
                        env, log)
        key = json.loads(out.strip().splitlines()[-1])["key"]
        say("")
        say(HEADER)
        with asyncio.Runner(loop_factory=cb._new_loop) as runner:
            for n in counts:
                r = run_count(runner, procs, env, tmp, key, fake.pid, urlsplit(fake_url).port, n, args)
                results.append(r)
                say(fmt(r))
                for sample in r["failure_samples"]:
                    say(f"    failure: {sample}")
        upstream_rss = cb.peak_rss_mb(fake.pid)
    except cb.SetupError as exc:
        print(f"ws bench: set-up failed: {exc}", file=sys.stderr)
        print(f"(logs in {tmp})", file=sys.stderr)
        args.keep = True
        return 2
    finally:
        procs.stop_all()
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)

    say("")
    say("ttft: message sent -> first delta frame (platform) / first content chunk (upstream direct), ms; "
        "+p50/+p95: the platform's percentile minus the upstream's; strm: message -> done, ms; RSS: the server's "
        "VmHWM; cpu s: CPU seconds of each process while the streams ran; other: other load on the machine (cores)")
    for r in results:
        say(f"{r['connections']} connections: {r['completed']}/{r['connections']} completed, handshakes p50 "
            f"{r['handshake_ms']['p50']} ms / p95 {r['handshake_ms']['p95']} ms (all open in {r['open_seconds']} s), "
            f"{r['frames_per_second']} frames/s, RSS {r['server_rss_mb']['warm']} MB warm -> "
            f"{r['server_rss_mb']['connected']} MB connected ({r['rss_per_open_connection_kb']} KB/connection) -> "
            f"peak {r['server_rss_mb']['peak_vmhwm']} MB")
    print(json.dumps({"bench": "websocket_streams", "cpus": os.cpu_count(), "tokens": args.tokens,
                      "gap_ms": args.gap_ms, "ramp_seconds": args.ramp, "upstream_peak_rss_mb": upstream_rss,
                      "results": [{k: v for k, v in r.items() if k != "failure_samples"} for r in results]},
                     separators=(",", ":")), flush=True)
    return 0 if all(r["completion_rate"] == 1 for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())

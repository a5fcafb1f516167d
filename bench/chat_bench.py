#!/usr/bin/env python
"""Throughput and latency of POST /v1/chat/completions: the platform versus its upstream.

    .venv/bin/python bench/chat_bench.py [--seconds 5] [--rounds 1] [--server daphne|uvicorn|gunicorn]
        [--workers N] [--stream] [--database-url URL] [--redis-url URL] [--json-only]

Self-contained: it makes a temporary VAR_DIR (its own SQLite database), migrates it, creates
an agent `bench` (model `openai/bench-model`) and a client API key for it, starts the fake
OpenAI upstream (agentplatform/testing/fake_openai.py) and ONE platform server process
(daphne by default; --workers N: N processes on one listening socket, as gunicorn with
uvicorn's worker (scripts/prod.sh) or N daphne processes sharing the socket by --fd) pointed
at it, then measures, each after a warm-up:

    upstream c1    the fake upstream directly, 1 connection       (the floor)
    platform c1    the platform, 1 connection
    upstream c16   the fake upstream directly, 16 connections
    platform c16   the platform, 16 connections
    (--stream: the same at c1 with "stream": true: time to the first SSE event and to the end)

The load generator is raw asyncio streams (uvloop when importable): one HTTP/1.1 keep-alive
connection per concurrent worker, pre-built request bytes, parsing only the status line and
Content-Length / chunked framing, so that the client stays cheap on a small box where client,
server and upstream share the cores. Every response must be a 200; anything else is counted
as an error (and fails the run's flags).

It prints a table, then one JSON line (the last line of stdout) for notes and CI artifacts:
rps, p50, p99 per case, added_p50_ms_c1 (platform c1 p50 minus upstream c1 p50),
throughput_c16, ratio_vs_litellm_c16 (platform c16 rps / 90), pass flags against the targets
(c16 >= 270 req/s, added p50 at c1 < 3 ms), the server's peak RSS (VmHWM) and, per case, the
CPU each process spent per request and the CPU other processes on the machine used meanwhile
("other load": when it is high, the figures are noisy: rerun).

--database-url / --redis-url pass DATABASE_URL / REDIS_URL through (the production stack);
that database is migrated (and created if it does not exist, for PostgreSQL).
Exit status: 0 when both targets are met without errors, 1 when not, 2 when the set-up failed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import re
import secrets
import select
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

ROOT = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
CLK_TCK = os.sysconf("SC_CLK_TCK")

LITELLM_RPS_C16 = 90.0          # LiteLLM Proxy, 2-core box (the reference figure)
LITELLM_ADDED_P50_MS = 12.6     # LiteLLM Proxy's added median latency
TARGET_RPS_C16 = 3 * LITELLM_RPS_C16      # 270 req/s
TARGET_ADDED_P50_MS = 3.0

AGENT = "bench"
UPSTREAM_MODEL = "bench-model"
PROMPT = "Say hello in five words."

# Settings the bench decides itself: never inherited from the caller's environment.
STRIPPED_ENV = {
    "DJANGO_SETTINGS_MODULE", "READ_DOT_ENV", "DATABASE_URL", "REDIS_URL", "CACHE_URL", "CELERY_BROKER_URL",
    "CELERY_RESULT_BACKEND", "CELERY_TASK_ALWAYS_EAGER", "LLM_PROVIDERS", "OPENAI_API_KEY", "OPENAI_BASE_URL",
    "DEBUG", "SECRET_KEY", "VAR_DIR", "ALLOWED_HOSTS", "DEMO_MODEL",
}


class SetupError(Exception):
    pass


# --------------------------------------------------------------------------- HTTP client

class Conn:
    """One HTTP/1.1 keep-alive connection."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def open(self) -> None:
        self.reader, self.writer = await asyncio.open_connection(self.host, self.port, limit=1 << 20)
        sock = self.writer.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.reader = self.writer = None


async def read_chunked(reader: asyncio.StreamReader, t0: float, marks: dict | None) -> bytes:
    parts = []
    while True:
        line = await reader.readuntil(b"\r\n")
        size = int(line.split(b";", 1)[0], 16)
        if size == 0:
            while await reader.readuntil(b"\r\n") != b"\r\n":   # trailers
                pass
            return b"".join(parts)
        chunk = (await reader.readexactly(size + 2))[:-2]
        if marks is not None and "first_event" not in marks and b"data:" in chunk:
            marks["first_event"] = time.perf_counter() - t0
        parts.append(chunk)


async def read_response(reader: asyncio.StreamReader, t0: float, marks: dict | None = None) -> tuple[int, bytes, bool]:
    """Status, body, whether the connection stays open."""
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head[9:12])
    lower = head.lower()
    keep_alive = b"\r\nconnection: close" not in lower and not head.startswith(b"HTTP/1.0")
    i = lower.find(b"\r\ncontent-length:")
    if i >= 0:
        j = lower.index(b"\r\n", i + 2)
        body = await reader.readexactly(int(head[i + 17:j]))
        if marks is not None:
            marks.setdefault("first_event", time.perf_counter() - t0)
    elif b"\r\ntransfer-encoding: chunked" in lower:
        body = await read_chunked(reader, t0, marks)
    else:                                                   # delimited by the close
        body = await reader.read()
        keep_alive = False
    return status, body, keep_alive


def build_request(host: str, port: int, path: str, body: dict, token: str,
                  headers: dict[str, str] | None = None) -> bytes:
    payload = json.dumps(body, separators=(",", ":")).encode()
    extra = "".join(f"{name}: {value}\r\n" for name, value in (headers or {}).items())
    return (f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nAuthorization: Bearer {token}\r\n{extra}"
            f"Content-Type: application/json\r\nAccept: */*\r\nContent-Length: {len(payload)}\r\n\r\n"
            ).encode() + payload


def chat_body(model: str, stream: bool) -> dict:
    body = {"model": model, "messages": [{"role": "user", "content": PROMPT}], "max_tokens": 32}
    if stream:
        body["stream"] = True
    return body


# --------------------------------------------------------------------------- measurement

@dataclass
class Phase:
    latencies: list = field(default_factory=list)      # seconds, successful requests only
    first_event: list = field(default_factory=list)    # seconds (streams)
    ok: int = 0
    errors: int = 0
    error_samples: list = field(default_factory=list)
    checked: bool = False


def _check_body(body: bytes, stream: bool) -> str | None:
    """The first 200 of a case must be a real completion (not, say, an error page)."""
    if stream:
        return None if b"data: [DONE]" in body and b"chat.completion.chunk" in body else "no [DONE] / chunks in stream"
    try:
        data = json.loads(body)
        content = data["choices"][0]["message"]["content"]
    except (ValueError, KeyError, IndexError, TypeError):
        return "not a chat.completion"
    return None if isinstance(content, str) and content else "empty content"


async def _worker(conn: Conn, request: bytes, phase: Phase, stream: bool, budget: list | None,
                  deadline: float | None) -> None:
    while True:
        if budget is not None:
            if budget[0] <= 0:
                return
            budget[0] -= 1
        elif time.perf_counter() >= deadline:
            return
        marks = {} if stream else None
        try:
            if conn.writer is None:
                await conn.open()
            t0 = time.perf_counter()
            conn.writer.write(request)
            status, body, keep_alive = await read_response(conn.reader, t0, marks)
            elapsed = time.perf_counter() - t0
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError) as exc:
            conn.close()
            phase.errors += 1
            if len(phase.error_samples) < 3:
                phase.error_samples.append(f"{type(exc).__name__}: {exc}")
            await asyncio.sleep(0.01)
            continue
        if not keep_alive:
            conn.close()
        if status != 200:
            phase.errors += 1
            if len(phase.error_samples) < 3:
                phase.error_samples.append(f"HTTP {status}: {body[:300].decode(errors='replace')}")
            continue
        if not phase.checked:
            phase.checked = True
            problem = _check_body(body, stream)
            if problem:
                phase.errors += 1
                phase.error_samples.append(f"bad 200 ({problem}): {body[:300].decode(errors='replace')}")
                continue
        phase.ok += 1
        phase.latencies.append(elapsed)
        if stream:
            phase.first_event.append(marks.get("first_event", elapsed))


def _proc_cpu(pid: int) -> float:
    """utime + stime of a process, seconds."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def process_tree(pid: int) -> list[int]:
    """`pid` and its descendants (a pre-fork server's master and workers)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    tree, todo = [], [pid]
    while todo:
        p = todo.pop()
        tree.append(p)
        todo.extend(children.get(p, []))
    return tree


def tree_cpu(pid: int) -> float:
    """CPU seconds of a process and its living descendants."""
    total = 0.0
    for p in process_tree(pid):
        try:
            total += _proc_cpu(p)
        except OSError:
            pass
    return total


def _machine_busy() -> float:
    """CPU seconds the whole machine spent busy (all cores)."""
    with open("/proc/stat") as f:
        values = [int(v) for v in f.readline().split()[1:]]
    idle = values[3] + (values[4] if len(values) > 4 else 0)
    return (sum(values[:8]) - idle) / CLK_TCK


def pct(values: list, q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, max(0, math.ceil(q / 100 * len(s)) - 1))]


async def run_case(host: str, port: int, request: bytes, *, concurrency: int, warmup: int, seconds: float,
                   stream: bool, pids: dict) -> dict:
    conns = [Conn(host, port) for _ in range(concurrency)]
    try:
        for c in conns:
            await c.open()
        warm = Phase()
        budget = [warmup]
        await asyncio.gather(*(_worker(c, request, warm, stream, budget, None) for c in conns))

        phase = Phase(checked=True) if warm.checked and not warm.errors else Phase()
        # The server's workers are its children; the client's children are the servers.
        cpu_of = {name: tree_cpu if name == "server" else _proc_cpu for name in pids}
        cpu0 = {name: cpu_of[name](pid) for name, pid in pids.items()}
        busy0 = _machine_busy()
        t0 = time.perf_counter()
        await asyncio.gather(*(_worker(c, request, phase, stream, None, t0 + seconds) for c in conns))
        wall = time.perf_counter() - t0
        busy = _machine_busy() - busy0
        cpu = {name: cpu_of[name](pid) - cpu0[name] for name, pid in pids.items()}
    finally:
        for c in conns:
            c.close()
    errors = warm.errors + phase.errors
    ok = max(phase.ok, 1)
    ours = sum(cpu.values())
    result = {
        "concurrency": concurrency,
        "requests": phase.ok,
        "errors": errors,
        "seconds": round(wall, 3),
        "rps": round(phase.ok / wall, 1),
        "p50_ms": round(pct(phase.latencies, 50) * 1000, 3),
        "p99_ms": round(pct(phase.latencies, 99) * 1000, 3),
        "mean_ms": round(statistics.fmean(phase.latencies) * 1000, 3) if phase.latencies else float("nan"),
        "cpu_ms_per_req": {name: round(v * 1000 / ok, 3) for name, v in cpu.items()},
        "cpu_cores": {name: round(v / wall, 2) for name, v in cpu.items()},
        "other_load_cores": round(max(0.0, busy - ours) / wall, 2),
    }
    if stream:
        result["first_event_p50_ms"] = round(pct(phase.first_event, 50) * 1000, 3)
        result["first_event_p99_ms"] = round(pct(phase.first_event, 99) * 1000, 3)
    samples = warm.error_samples + phase.error_samples
    if samples:
        result["error_samples"] = samples[:3]
    return result


# --------------------------------------------------------------------------- processes

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def log_tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def manage(args: list[str], env: dict, log: Path) -> str:
    proc = subprocess.run([PYTHON, "manage.py", *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    with log.open("a") as f:
        f.write(f"$ manage.py {' '.join(args)}\n{proc.stdout}{proc.stderr}\n")
    if proc.returncode != 0:
        raise SetupError(f"manage.py {args[0]} failed ({proc.returncode}):\n{proc.stderr[-3000:] or proc.stdout[-3000:]}")
    return proc.stdout


def ensure_postgres_database(url: str) -> None:
    """CREATE DATABASE when the URL names a PostgreSQL database that does not exist yet."""
    parts = urlsplit(url)
    if not parts.scheme.startswith(("postgres", "pgsql")):
        return
    name = parts.path.lstrip("/")
    try:
        import psycopg
        from psycopg import sql
    except ImportError:
        return
    admin = parts._replace(path="/postgres").geturl().replace(parts.scheme + "://", "postgresql://", 1)
    try:
        with psycopg.connect(admin, autocommit=True, connect_timeout=5) as conn:
            if not conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone():
                conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    except psycopg.Error as exc:
        raise SetupError(f"cannot reach or create the PostgreSQL database {name!r}: {exc}") from None


SETUP_SNIPPET = f"""
from agents.models import Agent
agent = Agent.objects.filter(name={AGENT!r}).first() or Agent(name={AGENT!r})
agent.model = "openai/{UPSTREAM_MODEL}"
agent.system_prompt = ""
agent.fallback_models = []
agent.enabled = True
agent.full_clean()
agent.save()
agent.skills.clear()
print(agent.pk)
"""


class Procs:
    def __init__(self) -> None:
        self.procs: list[tuple[str, subprocess.Popen]] = []

    def start(self, name: str, cmd: list[str], env: dict, log: Path, pipe_stdout: bool = False) -> subprocess.Popen:
        out = subprocess.PIPE if pipe_stdout else log.open("ab")
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=out,
                                stderr=subprocess.STDOUT if pipe_stdout else out, start_new_session=True)
        if not pipe_stdout:
            out.close()
        self.procs.append((name, proc))
        return proc

    def stop_all(self) -> None:
        for _, proc in reversed(self.procs):
            if proc.poll() is None:
                proc.terminate()
        for _, proc in reversed(self.procs):
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
            if proc.stdout is not None:
                proc.stdout.close()


def wait_listening_line(proc: subprocess.Popen, log: Path, timeout: float = 30.0) -> str:
    """Read the fake's stdout until `fake-openai listening on URL`, then drain it to the log."""
    deadline = time.monotonic() + timeout
    fd = proc.stdout.fileno()
    buf = b""
    with log.open("ab") as f:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([fd], [], [], 0.2)
            if ready:
                data = os.read(fd, 4096)
                if not data:
                    break
                buf += data
                f.write(data)
                m = re.search(rb"listening on (http://\S+)", buf)
                if m:
                    def drain() -> None:
                        with log.open("ab") as out:
                            for chunk in iter(lambda: os.read(fd, 4096), b""):
                                out.write(chunk)
                    threading.Thread(target=drain, daemon=True).start()
                    return m.group(1).decode()
            elif proc.poll() is not None:
                break
    raise SetupError(f"the fake upstream did not start:\n{buf.decode(errors='replace')[-2000:]}")


def wait_http_ok(port: int, proc: subprocess.Popen, log: Path, timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SetupError(f"the server exited ({proc.returncode}):\n{log_tail(log)}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=2) as s:
                s.sendall(f"GET /health HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n".encode())
                if s.recv(64).startswith(b"HTTP/1.1 200"):
                    return
        except OSError:
            pass
        time.sleep(0.2)
    raise SetupError(f"the server did not answer /health within {timeout:.0f}s:\n{log_tail(log)}")


def proc_status_mb(pid: int, field: str) -> float | None:
    """A memory figure of /proc/<pid>/status in MB (VmRSS: now; VmHWM: the peak)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(f"{field}:"):
                    return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    return None


def peak_rss_mb(pid: int) -> float | None:
    """Peak RSS (VmHWM) of a process and its descendants, summed."""
    values = [v for v in (proc_status_mb(p, "VmHWM") for p in process_tree(pid)) if v is not None]
    return round(sum(values), 1) if values else None


# N daphne processes sharing one listening socket (daphne --fd): what a pre-fork server does,
# without the supervision. The launcher binds, starts the workers, forwards SIGTERM.
DAPHNE_FD_LAUNCHER = """
import os, signal, socket, subprocess, sys
host, port, workers = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
sock = socket.socket()
sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
sock.bind((host, port))
sock.listen(1024)
fd = sock.fileno()
procs = [subprocess.Popen([sys.executable, "-m", "daphne", "-v", "0", "--fd", str(fd), *sys.argv[4:]],
                          pass_fds=[fd]) for _ in range(workers)]
def stop(*_):
    for p in procs:
        p.terminate()
signal.signal(signal.SIGTERM, stop)
for p in procs:
    p.wait()
"""


def server_command(server: str, workers: int, port: int, app: str = "agentplatform.asgi:application") -> list[str]:
    """The command that serves the platform on 127.0.0.1:port with `workers` processes."""
    if server == "gunicorn":
        return [PYTHON, "-m", "gunicorn", "-c", "python:agentplatform.gunicorn_conf", "-w", str(workers),
                "-b", f"127.0.0.1:{port}", "--log-level", "warning", app]
    if server == "daphne" and workers > 1:
        return [PYTHON, "-c", DAPHNE_FD_LAUNCHER, "127.0.0.1", str(port), str(workers), app]
    if workers > 1:
        raise SetupError("--workers > 1 needs --server gunicorn or daphne")
    if server == "daphne":
        return [PYTHON, "-m", "daphne", "-v", "0", "-b", "127.0.0.1", "-p", str(port), app]
    return [PYTHON, "-m", "uvicorn", "--no-access-log", "--log-level", "warning", "--host", "127.0.0.1",
            "--port", str(port), app]


def start_upstream(procs: Procs, env: dict, log: Path) -> tuple[str, int, subprocess.Popen]:
    """The fake OpenAI upstream on a free port: its base URL (.../v1), port and process."""
    fake = procs.start("upstream", [PYTHON, str(ROOT / "agentplatform/testing/fake_openai.py"),
                                    "--host", "127.0.0.1", "--port", "0"], env, log, pipe_stdout=True)
    url = wait_listening_line(fake, log)
    return url, urlsplit(url).port, fake


def bench_env(tmp: Path, *, database_url: str = "", redis_url: str = "") -> dict:
    """The platform's environment for a bench: DEBUG off, a random SECRET_KEY, the temp VAR_DIR."""
    env = {k: v for k, v in os.environ.items() if k not in STRIPPED_ENV}
    env.update(DEBUG="0", SECRET_KEY=secrets.token_urlsafe(50), VAR_DIR=str(tmp), OPENAI_API_KEY="sk-bench",
               PYTHONUNBUFFERED="1", PYTHONDONTWRITEBYTECODE="1")
    if database_url:
        env["DATABASE_URL"] = database_url
        ensure_postgres_database(database_url)
    if redis_url:
        env.update(REDIS_URL=redis_url, CACHE_KEY_PREFIX="apbench", CHANNEL_LAYER_PREFIX="apbench")
    return env


def start_platform(procs: Procs, env: dict, tmp: Path, log: Path, *, server: str = "daphne", workers: int = 1,
                   settings_module: str = "") -> tuple[int, str, subprocess.Popen]:
    """Migrate, make the agent `bench` and a client key for it, start the server (env must
    have OPENAI_BASE_URL). Returns the port, the key and the server process."""
    manage(["migrate", "--noinput", "-v", "0"], env, log)
    manage(["shell", "-c", SETUP_SNIPPET], env, log)
    out = manage(["create_api_key", "--name", "bench", "--role", "client", "--agents", AGENT, "--json"], env, log)
    key = json.loads(out.strip().splitlines()[-1])["key"]
    port = free_port()
    server_log = tmp / "server.log"
    server_env = dict(env, DJANGO_SETTINGS_MODULE=settings_module) if settings_module else env
    proc = procs.start("server", server_command(server, workers, port), server_env, server_log)
    wait_http_ok(port, proc, server_log)
    return port, key, proc


# --------------------------------------------------------------------------- report

def fmt_row(name: str, r: dict) -> str:
    cpu = r["cpu_ms_per_req"]
    line = (f"{name:<14} {r['rps']:>8.1f} {r['p50_ms']:>8.3f} {r['p99_ms']:>8.3f} {r['requests']:>7} {r['errors']:>6}"
            f"   {cpu.get('server', 0):>6.3f} {cpu.get('upstream', 0):>6.3f} {cpu.get('client', 0):>6.3f}"
            f"   {r['other_load_cores']:>5.2f}")
    if "first_event_p50_ms" in r:
        line += f"   first event p50 {r['first_event_p50_ms']:.3f} ms, p99 {r['first_event_p99_ms']:.3f} ms"
    return line


HEADER = (f"{'case':<14} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'n':>7} {'errors':>6}"
          f"   {'cpu ms/req: server':>6} {'upstr':>6} {'client':>6}   other load (cores)")


def median_case(rounds: list[dict]) -> dict:
    """Per-field median over rounds (rps and latencies alike); counts are summed."""
    if len(rounds) == 1:
        return rounds[0]
    out = dict(rounds[-1])
    for key in ("rps", "p50_ms", "p99_ms", "mean_ms", "first_event_p50_ms", "first_event_p99_ms", "other_load_cores"):
        if key in out:
            out[key] = round(statistics.median(r[key] for r in rounds), 3)
    out["cpu_ms_per_req"] = {k: round(statistics.median(r["cpu_ms_per_req"][k] for r in rounds), 3)
                             for k in out["cpu_ms_per_req"]}
    out["requests"] = sum(r["requests"] for r in rounds)
    out["errors"] = sum(r["errors"] for r in rounds)
    out["rps_spread"] = [min(r["rps"] for r in rounds), max(r["rps"] for r in rounds)]
    out["p50_spread_ms"] = [min(r["p50_ms"] for r in rounds), max(r["p50_ms"] for r in rounds)]
    return out


# --------------------------------------------------------------------------- main

def _new_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop
        return uvloop.new_event_loop()
    except ImportError:
        return asyncio.new_event_loop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=5.0, help="measured duration per case (default 5)")
    parser.add_argument("--warmup", type=int, default=300, help="warm-up requests before each case (default 300)")
    parser.add_argument("--rounds", type=int, default=1,
                        help="repeat the cases N times against the same processes; the summary takes medians")
    parser.add_argument("--concurrency", type=int, default=16, help="the high concurrency (default 16)")
    parser.add_argument("--server", choices=["daphne", "uvicorn", "gunicorn"], default="daphne",
                        help="gunicorn: uvicorn's worker under gunicorn, as scripts/prod.sh runs it")
    parser.add_argument("--workers", type=int, default=1,
                        help="server processes on the one port (gunicorn, or daphne sharing the socket by --fd)")
    parser.add_argument("--stream", action="store_true", help="also measure stream=true at c1")
    parser.add_argument("--database-url", default="", help="DATABASE_URL for the server (default: a temp SQLite)")
    parser.add_argument("--redis-url", default="", help="REDIS_URL for the server (default: none, embedded mode)")
    parser.add_argument("--keep", action="store_true", help="keep the temp dir (logs, SQLite DB)")
    parser.add_argument("--json-only", action="store_true", help="print only the final JSON line")
    parser.add_argument("--settings", default="",
                        help="DJANGO_SETTINGS_MODULE of the server (e.g. bench.settings_without_governance)")
    args = parser.parse_args(argv)
    if args.seconds <= 0 or args.warmup < 0 or args.rounds < 1 or args.concurrency < 1 or args.workers < 1:
        parser.error("--seconds, --rounds and --concurrency must be positive, --warmup >= 0")

    def say(*a) -> None:
        if not args.json_only:
            print(*a, flush=True)

    tmp = Path(tempfile.mkdtemp(prefix="chat-bench-"))
    log = tmp / "bench.log"
    procs = Procs()
    try:
        env = bench_env(tmp, database_url=args.database_url, redis_url=args.redis_url)
        stack = ("postgres" if args.database_url else "sqlite") + ("+redis" if args.redis_url else "")

        say(f"chat bench: server {args.server} ({args.workers} process{'es' if args.workers > 1 else ''}), "
            f"{stack}, temp dir {tmp}")
        fake_url, fake_port, fake = start_upstream(procs, env, log)
        env["OPENAI_BASE_URL"] = fake_url

        say("migrating, creating the agent and the API key ...")
        port, key, server = start_platform(procs, env, tmp, log, server=args.server, workers=args.workers,
                                           settings_module=args.settings)
        server_log = tmp / "server.log"
        say(f"upstream {fake_url} (pid {fake.pid}), platform http://127.0.0.1:{port}/v1 (pid {server.pid})")

        pids = {"server": server.pid, "upstream": fake.pid, "client": os.getpid()}
        c_hi = args.concurrency
        cases = [("upstream", 1, False), ("platform", 1, False), ("upstream", c_hi, False), ("platform", c_hi, False)]
        if args.stream:
            cases += [("upstream", 1, True), ("platform", 1, True)]
        requests = {
            ("upstream", False): build_request("127.0.0.1", fake_port, "/v1/chat/completions",
                                               chat_body(UPSTREAM_MODEL, False), "sk-bench"),
            ("platform", False): build_request("127.0.0.1", port, "/v1/chat/completions",
                                               chat_body(AGENT, False), key),
            ("upstream", True): build_request("127.0.0.1", fake_port, "/v1/chat/completions",
                                              chat_body(UPSTREAM_MODEL, True), "sk-bench"),
            ("platform", True): build_request("127.0.0.1", port, "/v1/chat/completions",
                                              chat_body(AGENT, True), key),
        }

        rounds: dict[str, list[dict]] = {}
        with asyncio.Runner(loop_factory=_new_loop) as runner:
            for rnd in range(args.rounds):
                say(f"\nround {rnd + 1}/{args.rounds}: {args.seconds:g}s per case after {args.warmup} warm-up requests")
                say(HEADER)
                for target, conc, stream in cases:
                    name = f"{target}{' stream' if stream else ''} c{conc}"
                    host_port = fake_port if target == "upstream" else port
                    r = runner.run(run_case("127.0.0.1", host_port, requests[(target, stream)], concurrency=conc,
                                            warmup=args.warmup, seconds=args.seconds, stream=stream, pids=pids))
                    rounds.setdefault(name, []).append(r)
                    say(fmt_row(name, r))
                    for sample in r.get("error_samples", []):
                        say(f"    error: {sample}")
        rss = peak_rss_mb(server.pid)
        upstream_rss = peak_rss_mb(fake.pid)
        if server.poll() is not None:
            raise SetupError(f"the server died during the run:\n{log_tail(server_log)}")
    except SetupError as exc:
        print(f"chat bench: set-up failed: {exc}", file=sys.stderr)
        print(f"(logs: {log}, {tmp / 'server.log'})", file=sys.stderr)
        args.keep = True
        return 2
    finally:
        procs.stop_all()
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)

    summary = {name: median_case(rs) for name, rs in rounds.items()}
    up1, pl1 = summary["upstream c1"], summary["platform c1"]
    uph, plh = summary[f"upstream c{c_hi}"], summary[f"platform c{c_hi}"]
    errors = sum(r["errors"] for r in summary.values())
    added_p50 = round(pl1["p50_ms"] - up1["p50_ms"], 3)
    added_p99 = round(pl1["p99_ms"] - up1["p99_ms"], 3)
    throughput = plh["rps"]
    pass_rps = throughput >= TARGET_RPS_C16 and errors == 0
    pass_lat = added_p50 < TARGET_ADDED_P50_MS and errors == 0

    if args.rounds > 1:
        say(f"\nmedians over {args.rounds} rounds (spread: min..max req/s, p50)")
        say(HEADER)
        for name, r in summary.items():
            say(fmt_row(name, r) + f"   [{r['rps_spread'][0]:.0f}..{r['rps_spread'][1]:.0f} req/s, "
                f"p50 {r['p50_spread_ms'][0]:.3f}..{r['p50_spread_ms'][1]:.3f} ms]")
    say("")
    say(f"added latency c1 (platform - upstream): p50 {added_p50:.3f} ms, p99 {added_p99:.3f} ms   "
        f"target < {TARGET_ADDED_P50_MS:g} ms (LiteLLM ~{LITELLM_ADDED_P50_MS:g} ms): "
        f"{'PASS' if pass_lat else 'FAIL'}")
    say(f"throughput c{c_hi}: platform {throughput:.1f} req/s = {throughput / uph['rps']:.2f}x upstream direct "
        f"({uph['rps']:.1f}), {throughput / LITELLM_RPS_C16:.2f}x LiteLLM (~{LITELLM_RPS_C16:g})   "
        f"target >= {TARGET_RPS_C16:g}: {'PASS' if pass_rps else 'FAIL'}")
    say(f"platform c1: {pl1['rps']:.1f} req/s = {pl1['rps'] / up1['rps']:.2f}x upstream direct; "
        f"server CPU {plh['cpu_ms_per_req']['server']:.3f} ms/request at c{c_hi}; peak RSS {rss} MB "
        f"(upstream {upstream_rss} MB)")
    if errors:
        say(f"ERRORS: {errors} failed requests: the figures do not count")
    busy = max(r["other_load_cores"] for r in summary.values())
    if busy >= 0.3:
        say(f"note: other processes used up to {busy:.2f} cores during the run"
            + (" (PostgreSQL/Redis count as other processes here)" if stack != "sqlite" else "")
            + ": when that is others' work, the figures are noisy: rerun on a quiet machine")

    result = {
        "bench": "chat_completions",
        "server": args.server,
        "workers": args.workers,
        "stack": stack,
        "cpus": os.cpu_count(),
        "seconds_per_case": args.seconds,
        "warmup": args.warmup,
        "rounds": args.rounds,
        "cases": {name.replace(" ", "_"): {k: v for k, v in r.items() if k != "error_samples"}
                  for name, r in summary.items()},
        "added_p50_ms_c1": added_p50,
        "added_p99_ms_c1": added_p99,
        f"throughput_c{c_hi}": throughput,
        f"ratio_vs_litellm_c{c_hi}": round(throughput / LITELLM_RPS_C16, 2),
        f"ratio_vs_upstream_c{c_hi}": round(throughput / uph["rps"], 3) if uph["rps"] else None,
        "server_peak_rss_mb": rss,
        "upstream_peak_rss_mb": upstream_rss,
        "errors": errors,
        "targets": {"throughput_c16_min": TARGET_RPS_C16, "added_p50_ms_c1_max": TARGET_ADDED_P50_MS,
                    "litellm_rps_c16": LITELLM_RPS_C16, "litellm_added_p50_ms": LITELLM_ADDED_P50_MS},
        "pass": {"throughput_c16": pass_rps, "added_p50_c1": pass_lat},
    }
    if args.rounds > 1:
        result["per_round"] = {name.replace(" ", "_"): [{"rps": r["rps"], "p50_ms": r["p50_ms"], "p99_ms": r["p99_ms"]}
                                                        for r in rs] for name, rs in rounds.items()}
    print(json.dumps(result, separators=(",", ":")), flush=True)
    return 0 if pass_rps and pass_lat else 1


if __name__ == "__main__":
    sys.exit(main())

"""Redis outages degrade, they do not break (agentplatform.cache, agentplatform.channels).

A real Daphne server (its own SQLite file) whose REDIS_URL goes through a TCP proxy in this test
process, to this machine's Redis: the proxy refuses connections (Redis down), swallows them
(Redis hanging) or forwards them again (Redis back), so the server meets real connection errors
and timeouts and resumes without a restart. In process: RATE_LIMIT_FAIL_MODE against a dead port.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import socket
import sqlite3
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest
from django.conf import settings as django_settings
from websockets.asyncio.client import connect

from conftest import ROOT, assert_error, free_port, parse_sse, spawn_daphne, stop_processes, wait_ready

needs_redis = pytest.mark.skipif(
    not django_settings.REDIS_URL,
    reason="needs REDIS_URL: the server under test is pointed at a proxy to that Redis, which the test takes "
           "down and brings back (the PostgreSQL+Redis CI lane runs it)")

AGENTS_YAML = """
agents:
  - name: echo
    model: openai/gpt-4o-mini
"""

SETUP = """
import io, json, sys
import django
django.setup()
from django.core.management import call_command
from governance.models import ApiKey
call_command("migrate", verbosity=0)
call_command("load_agents", sys.argv[1], stdout=io.StringIO())
keys = {}
for name, role in (("client", "client"), ("victim", "client"), ("admin", "admin")):
    out = io.StringIO()
    call_command("create_api_key", name=name, role=role, json=True, stdout=out)
    keys[name] = json.loads(out.getvalue().strip().splitlines()[-1])["key"]
ApiKey.objects.filter(name="client").update(rate_limit_rpm=1000)
print(json.dumps(keys))
"""


class FlakyProxy:
    """A TCP proxy to `target` that can refuse (down), swallow (hang) or forward (up)."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.port = free_port()
        self.mode = "up"
        self.lock = threading.Lock()
        self.sockets: list[socket.socket] = []
        self.listener: socket.socket | None = None
        self._listen()

    def _listen(self) -> None:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        listener.settimeout(0.1)
        self.listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def _accept(self, listener: socket.socket) -> None:
        while self.listener is listener:
            try:
                conn, _ = listener.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            conn.settimeout(None)
            with self.lock:
                self.sockets.append(conn)
            if self.mode == "hang":
                continue  # accepted, never answered: the client's read times out
            try:
                upstream = socket.create_connection(self.target, timeout=2)
            except OSError:
                conn.close()
                continue
            upstream.settimeout(None)
            with self.lock:
                self.sockets.append(upstream)
            for a, b in ((conn, upstream), (upstream, conn)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def _drop_connections(self) -> None:
        with self.lock:
            sockets, self.sockets = self.sockets, []
        for s in sockets:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()

    def down(self) -> None:
        """Connections refused, open ones reset."""
        self.mode = "down"
        listener, self.listener = self.listener, None
        if listener is not None:
            listener.close()
        self._drop_connections()

    def hang(self) -> None:
        """Connections accepted and never answered."""
        self.mode = "hang"
        self._drop_connections()
        if self.listener is None:
            self._listen()

    def up(self) -> None:
        self.mode = "up"
        self._drop_connections()
        if self.listener is None:
            self._listen()

    def close(self) -> None:
        self.down()


class Server:
    def __init__(self, url: str, keys: dict, db_path: Path, log_path: Path) -> None:
        self.url, self.keys, self.db_path, self.log_path = url, keys, db_path, log_path

    def chat(self, key: str, message: str = "hello", **body) -> httpx.Response:
        return httpx.post(f"{self.url}/api/v1/agents/echo/chat", json={"message": message, **body},
                          headers={"Authorization": f"Bearer {key}"}, timeout=15)

    def query(self, sql: str, *params) -> list[tuple]:
        with sqlite3.connect(self.db_path, timeout=5) as db:
            return db.execute(sql, params).fetchall()


@pytest.fixture(scope="module")
def proxy():
    parts = urlsplit(django_settings.REDIS_URL)
    flaky = FlakyProxy((parts.hostname or "127.0.0.1", parts.port or 6379))
    yield flaky
    flaky.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory, fake_upstream, proxy):
    var_dir = tmp_path_factory.mktemp("redis-outage")
    env = {k: v for k, v in os.environ.items()
           if k not in ("DATABASE_URL", "REDIS_URL", "CACHE_URL", "CELERY_BROKER_URL", "CELERY_TASK_ALWAYS_EAGER",
                        "TEST_DATABASE_NAME", "METRICS_TOKEN", "ALLOW_INSECURE_SECRET_KEY", "READ_DOT_ENV")}
    db = urlsplit(django_settings.REDIS_URL).path or "/0"
    prefix = f"outage{uuid.uuid4().hex[:8]}"
    env.update(DJANGO_SETTINGS_MODULE="agentplatform.settings", DEBUG="0", SECRET_KEY=secrets.token_urlsafe(50),
               VAR_DIR=str(var_dir), OPENAI_API_KEY="sk-test", OPENAI_BASE_URL=fake_upstream.base_url,
               LOG_LEVEL="WARNING", REDIS_URL=f"redis://127.0.0.1:{proxy.port}{db}", CACHE_KEY_PREFIX=prefix,
               CHANNEL_LAYER_PREFIX=prefix, REDIS_RETRY_SECONDS="1", REDIS_TIMEOUT_SECONDS="0.5")
    definitions = var_dir / "agents.yaml"
    definitions.write_text(AGENTS_YAML, encoding="utf-8")
    setup = subprocess.run([sys.executable, "-c", SETUP, str(definitions)], cwd=ROOT, env=env,
                           capture_output=True, text=True, timeout=120)
    assert setup.returncode == 0, setup.stderr
    keys = json.loads(setup.stdout.strip().splitlines()[-1])
    log_path = var_dir / "daphne.log"
    process, url = spawn_daphne(env, log_path)
    try:
        wait_ready(process, url, log_path, time.monotonic() + 30)
        yield Server(url, keys, var_dir / "db.sqlite3", log_path)
    finally:
        proxy.up()
        stop_processes([process])


def _ready(server: Server) -> httpx.Response:
    return httpx.get(f"{server.url}/health/ready", timeout=15)


def _within(seconds: float, predicate) -> float:
    start = time.monotonic()
    while not predicate():
        assert time.monotonic() - start < seconds, "not seen in time"
        time.sleep(0.1)
    return time.monotonic() - start


async def _ws_turn(server: Server, key: str, content: str) -> list[dict]:
    ws_url = server.url.replace("http://", "ws://") + "/ws/agents/echo/chat/"
    async with connect(ws_url, additional_headers={"Authorization": f"Bearer {key}"}, proxy=None,
                       open_timeout=10, compression=None) as ws:
        frames = [json.loads(await asyncio.wait_for(ws.recv(), 10))]
        assert frames[0]["type"] == "ready", frames
        await ws.send(json.dumps({"type": "message", "content": content}))
        while frames[-1]["type"] not in ("done", "error"):
            frames.append(json.loads(await asyncio.wait_for(ws.recv(), 10)))
    return frames


@pytest.mark.slow
@pytest.mark.redis
@needs_redis
def test_it_serves_through_a_redis_outage_and_resumes_without_a_restart(server, proxy):
    client, victim, admin = server.keys["client"], server.keys["victim"], server.keys["admin"]
    victim_prefix = victim.split("_")[1]

    # Redis up: limits counted there, the victim key's entry cached there.
    before = server.chat(client)
    assert before.status_code == 200, before.text
    assert before.headers["X-RateLimit-Limit"] == "1000"
    assert server.chat(victim).status_code == 200
    assert _ready(server).status_code == 200

    proxy.down()
    started = time.monotonic()
    answered = server.chat(client, "during the outage")
    assert answered.status_code == 200, answered.text
    assert answered.json()["output"] == "Echo: during the outage"
    assert "X-RateLimit-Limit" not in answered.headers  # fail open: let through unchecked
    assert_error(server.chat("ap_000000000000_not-a-real-key"), 401, "invalid_api_key")
    stream = httpx.post(f"{server.url}/api/v1/agents/echo/chat", json={"message": "a stream", "stream": True},
                        headers={"Authorization": f"Bearer {client}"}, timeout=15)
    assert stream.status_code == 200
    events = parse_sse(stream.text)
    assert events[-1]["event"] == "done", events[-3:]
    frames = asyncio.run(_ws_turn(server, client, "over the websocket"))
    assert frames[0]["degraded"] == ["channel_layer"]  # it streams, but alone
    assert frames[-1]["type"] == "done", frames[-3:]
    assert "".join(f["content"] for f in frames if f["type"] == "delta") == "Echo: over the websocket"
    ready = _ready(server)
    assert ready.status_code == 503
    checks = ready.json()["checks"]
    for name in ("cache", "channel_layer", "broker"):
        assert checks[name]["status"] == "error" and "Redis" in checks[name]["detail"], checks
    assert checks["database"]["status"] == "ok"
    # All of that without waiting on Redis: a refused connection is skipped, not retried.
    assert time.monotonic() - started < 5

    # Revoked while Redis is down: refused at once (the database decides), and not let in by its
    # stale entry in Redis once Redis is back (the held-back invalidation goes first).
    revoked = httpx.post(f"{server.url}/api/v1/admin/api-keys/{victim_prefix}/revoke",
                         headers={"Authorization": f"Bearer {admin}"}, timeout=10)
    assert revoked.status_code == 200, revoked.text
    assert server.chat(victim).status_code == 401

    # Redis hanging (accepts, never answers): each call gives up after REDIS_TIMEOUT_SECONDS
    # (0.5 s), and then Redis is skipped for REDIS_RETRY_SECONDS.
    proxy.hang()
    time.sleep(1.2)
    took = []
    for i in range(5):
        t = time.monotonic()
        assert server.chat(client, f"hung {i}").status_code == 200
        took.append(time.monotonic() - t)
    assert max(took) < 3, took
    assert sorted(took)[2] < 0.5, took  # most requests never wait on the hung Redis

    proxy.up()
    assert _within(10, lambda: _ready(server).status_code == 200) < 10
    assert server.chat(victim).status_code == 401
    after = server.chat(client, "after the outage")
    assert after.status_code == 200
    assert after.headers["X-RateLimit-Limit"] == "1000"  # counted in Redis again
    frames = asyncio.run(_ws_turn(server, client, "after the outage"))
    assert "degraded" not in frames[0] and frames[-1]["type"] == "done"
    log = server.log_path.read_text()
    assert "is unavailable" in log and "answers again" in log
    assert "Traceback" not in log, log[-3000:]
    # Every turn was stored: 2 before, 4 during the outage (REST, SSE, WS; the bad key never
    # started one), 5 while hung, 2 after (the victim's refused ones never started).
    statuses = server.query("SELECT status, COUNT(*) FROM agents_run GROUP BY status")
    assert dict(statuses) == {"succeeded": 2 + 3 + 5 + 2}, statuses


# --- RATE_LIMIT_FAIL_MODE, in process ----------------------------------------------------------


@pytest.fixture
def dead_redis(settings):
    port = free_port()  # nothing listens there
    settings.REDIS_URL = f"redis://127.0.0.1:{port}/0"
    settings.REDIS_RETRY_SECONDS = 60.0
    return settings


@pytest.mark.django_db(transaction=True)
async def test_it_refuses_unchecked_turns_when_rate_limits_fail_closed(dead_redis, make_agent, make_key):
    from conftest import Api, orm
    from governance.models import ApiKey

    dead_redis.RATE_LIMIT_FAIL_MODE = "closed"
    await orm(make_agent, name="limited", model="local/demo")
    key = await orm(make_key)
    await orm(lambda: ApiKey.objects.filter(prefix=key.split("_")[1]).update(rate_limit_rpm=5))

    for _ in range(2):  # the first meets the dead port, the second is refused without trying
        response = await Api(key).post("/api/v1/agents/limited/chat", {"message": "hi"})
        body = assert_error(response, 503, "rate_limiter_unavailable")
        assert "RATE_LIMIT_FAIL_MODE" in body["message"]
        assert response.headers["Retry-After"] == "60"
    from agents.models import Run

    assert await orm(Run.objects.count) == 0  # refused before it started: nothing to bill


@pytest.mark.django_db(transaction=True)
async def test_it_lets_unchecked_turns_through_when_rate_limits_fail_open(dead_redis, make_agent, make_key):
    from conftest import Api, orm
    from governance.models import ApiKey
    from prometheus_client import REGISTRY

    dead_redis.RATE_LIMIT_FAIL_MODE = "open"
    await orm(make_agent, name="limited", model="local/demo")
    key = await orm(make_key)
    await orm(lambda: ApiKey.objects.filter(prefix=key.split("_")[1]).update(rate_limit_rpm=1))
    before = REGISTRY.get_sample_value("rate_limit_unchecked_total", {"mode": "open"}) or 0

    for _ in range(3):  # over the limit of 1, but nothing can count it
        response = await Api(key).post("/api/v1/agents/limited/chat", {"message": "hi"})
        assert response.status_code == 200, response.text
        assert "X-RateLimit-Limit" not in response.headers
    assert REGISTRY.get_sample_value("rate_limit_unchecked_total", {"mode": "open"}) == before + 3

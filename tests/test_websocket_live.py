"""End to end: the WebSocket chat on real Daphne servers (DEBUG off, their own SQLite file), driven
by the `websockets` client as a server client would (Bearer key, no Origin), with the fake OpenAI
server as upstream: streaming, ping during a stream, cancel, reconnecting with a session, close
codes; and with REDIS_URL two workers sharing the conversation and the channel layer."""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import sqlite3
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from django.conf import settings as django_settings
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from conftest import ROOT, spawn_daphne, stop_processes, wait_ready

pytestmark = pytest.mark.slow

AGENTS_YAML = """
agents:
  - name: echo
    model: openai/gpt-4o-mini
  - name: calc
    model: local/demo
    skills: [calculator]
"""

SETUP = """
import io, json, sys
import django
django.setup()
from django.core.management import call_command
call_command("migrate", verbosity=0)
call_command("load_agents", sys.argv[1], stdout=io.StringIO())
keys = {}
for name in ("live", "other"):
    out = io.StringIO()
    call_command("create_api_key", name=name, role="client", json=True, stdout=out)
    keys[name] = json.loads(out.getvalue().strip().splitlines()[-1])["key"]
print(json.dumps(keys))
"""


class Servers:
    def __init__(self, urls: list[str], keys: dict, db_path: Path, prefix: str) -> None:
        self.urls = urls
        self.keys = keys
        self.db_path = db_path
        self.prefix = prefix

    def ws(self, agent: str, *, worker: int = 0) -> str:
        return self.urls[worker].replace("http://", "ws://") + f"/ws/agents/{agent}/chat/"

    def query(self, sql: str, *params) -> list[tuple]:
        with sqlite3.connect(self.db_path, timeout=5) as db:
            return db.execute(sql, params).fetchall()


def _start(tmp_path_factory, fake_upstream, *, workers: int, redis_url: str = "") -> tuple[Servers, list]:
    var_dir = tmp_path_factory.mktemp("ws-live")
    env = {k: v for k, v in os.environ.items()
           if k not in ("DATABASE_URL", "REDIS_URL", "CACHE_URL", "CELERY_BROKER_URL", "CELERY_TASK_ALWAYS_EAGER",
                        "TEST_DATABASE_NAME", "METRICS_TOKEN", "ALLOW_INSECURE_SECRET_KEY", "READ_DOT_ENV")}
    prefix = f"wslive{uuid.uuid4().hex[:8]}"
    env.update(DJANGO_SETTINGS_MODULE="agentplatform.settings", DEBUG="0", SECRET_KEY=secrets.token_urlsafe(50),
               VAR_DIR=str(var_dir), OPENAI_API_KEY="sk-test", OPENAI_BASE_URL=fake_upstream.base_url,
               LOG_LEVEL="WARNING", WS_AUTH_TIMEOUT_SECONDS="1")
    if redis_url:
        env.update(REDIS_URL=redis_url, CACHE_KEY_PREFIX=prefix, CHANNEL_LAYER_PREFIX=prefix)
    definitions = var_dir / "agents.yaml"
    definitions.write_text(AGENTS_YAML, encoding="utf-8")
    setup = subprocess.run([sys.executable, "-c", SETUP, str(definitions)], cwd=ROOT, env=env,
                           capture_output=True, text=True, timeout=120)
    assert setup.returncode == 0, setup.stderr
    keys = json.loads(setup.stdout.strip().splitlines()[-1])
    processes, urls = [], []
    deadline = time.monotonic() + 30
    for n in range(workers):
        log_path = var_dir / f"daphne-{n}.log"
        process, url = spawn_daphne(env, log_path)
        processes.append(process)
        urls.append(url)
        try:
            wait_ready(process, url, log_path, deadline)
        except BaseException:
            stop_processes(processes)
            raise
    return Servers(urls, keys, var_dir / "db.sqlite3", prefix), processes


@pytest.fixture(scope="module")
def server(tmp_path_factory, fake_upstream):
    servers, processes = _start(tmp_path_factory, fake_upstream, workers=1)
    try:
        yield servers
    finally:
        stop_processes(processes)


def _open(servers: Servers, agent: str, key: str | None = None, *, worker: int = 0):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return connect(servers.ws(agent, worker=worker), additional_headers=headers, proxy=None, open_timeout=10,
                   compression=None)


async def _next(ws) -> dict:
    return json.loads(await asyncio.wait_for(ws.recv(), 10))


async def _turn(ws, content: str, **fields) -> list[dict]:
    await ws.send(json.dumps({"type": "message", "content": content, **fields}))
    frames = []
    while not frames or frames[-1]["type"] not in ("done", "error"):
        frames.append(await _next(ws))
    return frames


async def _close_code(ws) -> tuple[list[dict], int]:
    """Frames until the server closes, and its close code."""
    frames = []
    try:
        while True:
            frames.append(await _next(ws))
    except ConnectionClosed as closed:
        return frames, closed.rcvd.code


# --- one worker ------------------------------------------------------------------------------


async def test_it_streams_a_reply_token_by_token(server):
    async with _open(server, "echo", server.keys["live"]) as ws:
        assert (await _next(ws))["type"] == "ready"
        frames = await _turn(ws, "stream please [tokens:20] [gap:5]")

    kinds = [f["type"] for f in frames]
    assert kinds[0] == "start" and kinds[-2:] == ["usage", "done"] and kinds.count("delta") == 20
    done = frames[-1]
    assert done["output"] == " ".join(f"w{n}" for n in range(1, 21)) and done["cancelled"] is False
    assert server.query("SELECT status, transport FROM agents_run WHERE id = ?",
                        done["run_id"].replace("-", "")) == [("succeeded", "websocket")]


async def test_it_runs_tools_and_answers_ping_mid_stream(server):
    async with _open(server, "echo", server.keys["live"]) as ws:
        await _next(ws)
        await ws.send(json.dumps({"type": "message", "content": "slow [tokens:40] [gap:20]"}))
        assert (await _next(ws))["type"] == "start"
        assert (await _next(ws))["type"] == "delta"
        sent = time.perf_counter()
        await ws.send(json.dumps({"type": "ping", "id": 1}))
        while (frame := await _next(ws))["type"] != "pong":
            assert frame["type"] == "delta"
        pong_ms = (time.perf_counter() - sent) * 1000
        rest = []
        while not rest or rest[-1]["type"] != "done":
            rest.append(await _next(ws))
    async with _open(server, "calc", server.keys["live"]) as ws:
        await _next(ws)
        calc = await _turn(ws, "what is 12*12?")

    assert frame == {"type": "pong", "id": 1} and pong_ms < 500
    assert any(f["type"] == "delta" for f in rest)
    assert [f["type"] for f in calc][:3] == ["start", "tool_call", "tool_result"] and calc[-1]["output"].endswith("144")


async def test_cancel_ends_the_turn_and_keeps_the_partial_answer(server):
    async with _open(server, "echo", server.keys["live"]) as ws:
        await _next(ws)
        await ws.send(json.dumps({"type": "message", "content": "long [tokens:300] [gap:20]"}))
        start = await _next(ws)
        for _ in range(3):
            assert (await _next(ws))["type"] == "delta"
        await ws.send(json.dumps({"type": "cancel"}))
        while (done := await _next(ws))["type"] != "done":
            assert done["type"] == "delta"
        after = await _turn(ws, "and now a short one [tokens:2]")

    assert done["cancelled"] is True and done["run_id"] == start["run_id"]
    assert done["output"].startswith("w1 w2 w3") and done["usage"]["completion_tokens"] > 0
    run_id = start["run_id"].replace("-", "")
    assert server.query("SELECT status FROM agents_run WHERE id = ?", run_id) == [("cancelled",)]
    assert server.query("SELECT count(*), sum(estimated) FROM billing_usagerecord WHERE run_id = ?", run_id) == [(1, 1)]
    assert after[-1]["type"] == "done" and after[-1]["output"] == "w1 w2"


async def test_a_reconnect_with_the_session_id_continues_the_conversation(server):
    async with _open(server, "echo", server.keys["live"]) as ws:
        await _next(ws)
        first = (await _turn(ws, "a b"))[-1]
    async with _open(server, "echo", server.keys["live"]) as ws:
        await _next(ws)
        second = (await _turn(ws, "c", session_id=first["session_id"]))[-1]
    async with _open(server, "echo", server.keys["other"]) as ws:  # another key: not its session
        await _next(ws)
        foreign = (await _turn(ws, "d", session_id=first["session_id"]))[-1]

    assert second["session_id"] == first["session_id"]
    assert second["usage"]["prompt_tokens"] == first["usage"]["prompt_tokens"] + 4 + 2  # the history went along
    assert server.query("SELECT count(*) FROM agents_message WHERE session_id = ?",
                        first["session_id"].replace("-", "")) == [(4,)]
    assert foreign["type"] == "error" and foreign["code"] == "session_not_found"


async def test_the_close_codes(server):
    async with _open(server, "echo", "ap_nothing_here") as ws:
        bad_key, bad_key_code = await _close_code(ws)
    async with _open(server, "nobody", server.keys["live"]) as ws:
        unknown, unknown_code = await _close_code(ws)
    async with _open(server, "echo") as ws:  # no credentials, no auth frame: WS_AUTH_TIMEOUT_SECONDS=1
        silent, silent_code = await _close_code(ws)
    async with _open(server, "echo") as ws:
        await ws.send(json.dumps({"type": "auth", "key": server.keys["live"]}))
        ready = await _next(ws)
        by_frame = await _turn(ws, "hi")

    assert bad_key_code == 4401 and bad_key[-1]["code"] == "invalid_api_key"
    assert unknown_code == 4404 and unknown[-1]["code"] == "agent_not_found"
    assert silent_code == 4401 and silent[-1]["code"] == "authentication_required"
    assert ready["auth"] == "key" and by_frame[-1]["type"] == "done"


async def test_a_foreign_origin_cannot_use_a_cookie_and_a_bad_host_is_refused(server):
    cookie = {"Cookie": "sessionid=whatever", "Origin": "http://evil.example"}
    async with connect(server.ws("echo"), additional_headers=cookie, proxy=None, compression=None) as ws:
        frames, code = await _close_code(ws)
    port = int(server.urls[0].rsplit(":", 1)[1])
    with pytest.raises(InvalidStatus) as refused:  # Host: evil.example, connected to our server
        async with connect(f"ws://evil.example:{port}/ws/agents/echo/chat/", host="127.0.0.1", port=port,
                           proxy=None):
            pass

    assert code == 4401 and frames[-1]["code"] == "authentication_required"
    assert refused.value.response.status_code == 403


async def test_malformed_frames_get_error_frames_and_no_traceback(server):
    async with _open(server, "echo", server.keys["live"]) as ws:
        await _next(ws)
        answers = []
        for text in ("{oops", "[]", '{"type": "dance"}', json.dumps({"type": "message", "content": "x" * 600_000})):
            await ws.send(text)
            answers.append(await _next(ws))
        await ws.send(b"\x00binary")
        answers.append(await _next(ws))
        still = await _turn(ws, "still here?")

    assert [a["code"] for a in answers] == ["invalid_json", "invalid_json", "unknown_frame_type", "frame_too_large",
                                           "unsupported_frame"]
    assert still[-1]["type"] == "done"
    log = "\n".join(p.read_text(errors="replace") for p in server.db_path.parent.glob("daphne-*.log"))
    assert "Traceback" not in log, log[-3000:]


# --- two workers through Redis ------------------------------------------------------------------


@pytest.fixture(scope="module")
def two_workers(tmp_path_factory, fake_upstream):
    if not django_settings.REDIS_URL:
        pytest.skip("needs REDIS_URL: two server processes share the channel layer and cache through Redis "
                    "(the PostgreSQL+Redis CI lane runs it)")
    servers, processes = _start(tmp_path_factory, fake_upstream, workers=2, redis_url=django_settings.REDIS_URL)
    try:
        yield servers
    finally:
        stop_processes(processes)


@pytest.mark.redis
async def test_a_session_started_on_one_worker_continues_on_the_other(two_workers):
    async with _open(two_workers, "echo", two_workers.keys["live"], worker=0) as ws:
        await _next(ws)
        first = (await _turn(ws, "a b"))[-1]
    async with _open(two_workers, "echo", two_workers.keys["live"], worker=1) as ws:
        await _next(ws)
        second = (await _turn(ws, "c", session_id=first["session_id"]))[-1]

    assert second["session_id"] == first["session_id"]
    assert second["usage"]["prompt_tokens"] == first["usage"]["prompt_tokens"] + 4 + 2


@pytest.mark.redis
async def test_a_close_pushed_through_the_channel_layer_reaches_every_worker(two_workers):
    from channels_redis.core import RedisChannelLayer

    key = two_workers.keys["other"]
    key_id = two_workers.query("SELECT id FROM governance_apikey WHERE prefix = ?", key.split("_")[1])[0][0]
    layer = RedisChannelLayer(hosts=[{"address": django_settings.REDIS_URL, "socket_timeout": 15}],
                              prefix=two_workers.prefix)
    async with _open(two_workers, "echo", key, worker=0) as a, _open(two_workers, "echo", key, worker=1) as b:
        await _next(a)
        await _next(b)
        await a.send(json.dumps({"type": "message", "content": "long [tokens:300] [gap:20]"}))
        start = await _next(a)
        await _next(a)  # a delta: the turn streams on worker 0
        await layer.group_send(f"ws.key.{key_id}", {"type": "ws.close", "code": 4401, "message": "Key revoked."})
        frames_a, code_a = await _close_code(a)
        frames_b, code_b = await _close_code(b)
    await layer.close_pools()

    assert code_a == code_b == 4401
    assert frames_a[-1]["message"] == frames_b[-1]["message"] == "Key revoked."
    done = next(f for f in frames_a if f["type"] == "done")
    assert done["cancelled"] is True and done["run_id"] == start["run_id"]
    assert two_workers.query("SELECT status FROM agents_run WHERE id = ?",
                             start["run_id"].replace("-", "")) == [("cancelled",)]

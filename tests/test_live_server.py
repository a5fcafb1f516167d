"""End to end: a real Daphne server (DEBUG off, its own SQLite file) driven by the official
OpenAI SDK and raw HTTP, with the fake OpenAI server as its upstream. Agents and the API key
are made with our management commands, as an operator would."""

from __future__ import annotations

import json
import os
import secrets
import sqlite3
import subprocess
import sys
import time
import uuid
from pathlib import Path

import httpx
import openai
import pytest

from conftest import ROOT, spawn_daphne, stop_processes, wait_ready

pytestmark = pytest.mark.slow


AGENTS_YAML = """
agents:
  - name: echo
    model: openai/gpt-4o-mini
    description: Answers through the upstream.
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
out = io.StringIO()
call_command("create_api_key", name="live", role="client", json=True, stdout=out)
print(out.getvalue().strip().splitlines()[-1])
"""


class DaphneServer:
    def __init__(self, *, url: str, key: str, db_path: Path, log_path: Path) -> None:
        self.url = url
        self.key = key
        self.db_path = db_path
        self.log_path = log_path

    def sdk(self, key: str | None = None) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=key or self.key, max_retries=0, timeout=15)

    def async_sdk(self) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(base_url=f"{self.url}/v1", api_key=self.key, max_retries=0, timeout=15)

    def query(self, sql: str, *params) -> list[tuple]:
        with sqlite3.connect(self.db_path, timeout=5) as db:
            return db.execute(sql, params).fetchall()


@pytest.fixture(scope="module")
def daphne(tmp_path_factory, fake_upstream):
    var_dir = tmp_path_factory.mktemp("live-var")
    env = {k: v for k, v in os.environ.items()
           if k not in ("DATABASE_URL", "REDIS_URL", "CACHE_URL", "CELERY_BROKER_URL", "CELERY_TASK_ALWAYS_EAGER",
                        "TEST_DATABASE_NAME", "METRICS_TOKEN", "ALLOW_INSECURE_SECRET_KEY", "READ_DOT_ENV")}
    env.update(DJANGO_SETTINGS_MODULE="agentplatform.settings", DEBUG="0", SECRET_KEY=secrets.token_urlsafe(50),
               VAR_DIR=str(var_dir), OPENAI_API_KEY="sk-test", OPENAI_BASE_URL=fake_upstream.base_url,
               LOG_LEVEL="WARNING")
    definitions = var_dir / "agents.yaml"
    definitions.write_text(AGENTS_YAML, encoding="utf-8")
    setup = subprocess.run([sys.executable, "-c", SETUP, str(definitions)], cwd=ROOT, env=env,
                           capture_output=True, text=True, timeout=120)
    assert setup.returncode == 0, setup.stderr
    key = json.loads(setup.stdout.strip().splitlines()[-1])["key"]

    log_path = var_dir / "daphne.log"
    process, url = spawn_daphne(env, log_path)
    try:
        wait_ready(process, url, log_path, time.monotonic() + 30)
        yield DaphneServer(url=url, key=key, db_path=var_dir / "db.sqlite3", log_path=log_path)
    finally:
        stop_processes([process])


# --- the official SDK ----------------------------------------------------------------------


def test_it_answers_the_sdk(daphne):
    completion = daphne.sdk().chat.completions.create(
        model="echo", messages=[{"role": "user", "content": "hello from the SDK"}])

    assert completion.object == "chat.completion"
    assert completion.model == "echo"
    assert completion.choices[0].message.content == "Echo: hello from the SDK"
    assert completion.choices[0].finish_reason == "stop"
    assert completion.usage.total_tokens == completion.usage.prompt_tokens + completion.usage.completion_tokens > 0


def test_it_streams_to_the_sdk_with_a_usage_chunk(daphne):
    stream = daphne.sdk().chat.completions.create(
        model="echo", messages=[{"role": "user", "content": "stream me please"}], stream=True,
        stream_options={"include_usage": True})

    chunks = list(stream)

    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "Echo: stream me please"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].choices == []
    assert chunks[-1].usage.completion_tokens == 4
    assert chunks[-1].usage.total_tokens > 4


async def test_it_answers_the_async_sdk(daphne):
    async with daphne.async_sdk() as client:
        completion = await client.chat.completions.create(
            model="echo", messages=[{"role": "user", "content": "async hello"}])

    assert completion.choices[0].message.content == "Echo: async hello"


async def test_it_streams_to_the_async_sdk(daphne):
    async with daphne.async_sdk() as client:
        stream = await client.chat.completions.create(
            model="echo", messages=[{"role": "user", "content": "async stream [tokens:5]"}], stream=True)
        text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])

    assert text == "w1 w2 w3 w4 w5"


def test_it_runs_an_agents_tools_behind_the_sdk(daphne):
    completion = daphne.sdk().chat.completions.create(
        model="calc", messages=[{"role": "user", "content": "what is 6*7?"}])

    assert completion.choices[0].message.content.endswith("42")


def test_it_raises_the_sdks_errors(daphne):
    with pytest.raises(openai.NotFoundError) as not_found:
        daphne.sdk().chat.completions.create(model="no-such-agent",
                                                  messages=[{"role": "user", "content": "hi"}])
    assert not_found.value.code == "model_not_found"
    assert not_found.value.request_id

    with pytest.raises(openai.AuthenticationError):
        daphne.sdk(key="ap_123456789abc_wrong").chat.completions.create(
            model="echo", messages=[{"role": "user", "content": "hi"}])

    with pytest.raises(openai.BadRequestError) as bad:
        daphne.sdk().chat.completions.create(model="echo", messages=[{"role": "user", "content": "hi"}],
                                                  temperature=3)
    assert bad.value.param == "temperature"


def test_it_lists_models_to_the_sdk(daphne):
    assert sorted(m.id for m in daphne.sdk().models.list()) == ["calc", "echo"]


# --- raw HTTP ------------------------------------------------------------------------------


def test_it_refuses_an_oversized_body(daphne):
    body = b'{"message": "' + b"x" * (2 * 1024 * 1024) + b'"}'

    response = httpx.post(f"{daphne.url}/api/v1/agents/echo/chat", content=body, timeout=15,
                          headers={"Authorization": f"Bearer {daphne.key}", "Content-Type": "application/json"})

    assert response.status_code == 413
    assert response.json()["error"]["code"] == "request_too_large"


def test_it_answers_unknown_routes_with_json_when_debug_is_off(daphne):
    response = httpx.get(f"{daphne.url}/no/such/page")

    assert response.status_code == 404
    assert response.json()["error"]["code"] == "route_not_found"
    assert response.headers["X-Request-ID"] == response.json()["error"]["request_id"]


def test_it_is_ready(daphne):
    response = httpx.get(f"{daphne.url}/health/ready", timeout=10)

    assert response.status_code == 200
    checks = response.json()["checks"]
    assert {name: c["status"] for name, c in checks.items()} == {
        "database": "ok", "cache": "ok", "channel_layer": "ok", "broker": "ok", "circuits": "ok"}


def test_it_keeps_a_cancelled_run_when_the_client_hangs_up(daphne):
    headers = {"Authorization": f"Bearer {daphne.key}"}
    body = {"message": "a long story [gap:50] [tokens:200]", "stream": True}
    deltas = 0
    with httpx.Client(timeout=15) as client:
        with client.stream("POST", f"{daphne.url}/api/v1/agents/echo/chat", json=body,
                           headers=headers) as response:
            assert response.status_code == 200
            for line in response.iter_lines():
                if line.startswith("data: ") and '"type":"start"' in line:
                    run_id = uuid.UUID(json.loads(line[len("data: "):])["run_id"])
                if line == "event: delta":
                    deltas += 1
                    if deltas == 3:
                        break  # hang up mid-answer: the stream would go on for 10 s

    rows = []
    deadline = time.monotonic() + 10
    # The run exists from its start (status "running"); wait for the hang-up to end it.
    while (not rows or rows[0][0] == "running") and time.monotonic() < deadline:
        rows = daphne.query("SELECT status, transport, error_code FROM agents_run WHERE id = ?", run_id.hex)
        time.sleep(0.05)
    assert rows == [("cancelled", "sse", "")], daphne.log_path.read_text()[-2000:]
    messages = daphne.query("SELECT role, content FROM agents_message WHERE run_id = ? ORDER BY id", run_id.hex)
    assert [role for role, _ in messages] == ["user", "assistant"]
    assert messages[1][1].startswith("w1 w2")

"""Structured logs (agentplatform.logs): LOG_FORMAT=json writes one JSON object a line with the
request's context and the turn's fields, masked; LOG_LEVEL and LOG_FORMAT come from the
environment. In-process tests attach a handler built from settings.LOGGING's own formatter and
filters; a real daphne server shows what a deployment writes."""

from __future__ import annotations

import io
import json
import logging
import os
import secrets
import subprocess
import sys
import time

import httpx
import pytest
from django.conf import settings
from django.utils.module_loading import import_string

from conftest import ROOT, Api, free_port, orm, stop_processes, wait_ready

pytestmark = pytest.mark.django_db(transaction=True)


def _build(config: dict):
    config = dict(config)
    factory = import_string(config.pop("()"))
    return factory(**config)


@pytest.fixture
def json_log():
    """The root logger also writes to a buffer, formatted and filtered as settings.LOGGING's
    console handler is with LOG_FORMAT=json. Returns a function giving the lines as objects."""
    import agentplatform.asgi  # noqa: F401  (its django.setup() configures logging anew: before we add ours)
    from agentplatform.logs import request_id_var

    request_id_var.set("")  # not serving a request (an earlier test's event loop may have left its id)

    buffer = io.StringIO()
    handler = logging.StreamHandler(buffer)
    handler.setFormatter(_build(settings.LOGGING["formatters"]["json"]))
    for name in settings.LOGGING["handlers"]["console"]["filters"]:
        handler.addFilter(_build(settings.LOGGING["filters"][name]))
    root = logging.getLogger()
    root.addHandler(handler)
    levels = {name: logging.getLogger(name).level for name in ("", "agentplatform.turn", "agentplatform.access")}
    root.setLevel(logging.INFO)

    def lines() -> list[dict]:
        return [json.loads(line) for line in buffer.getvalue().splitlines() if line.strip()]

    lines.text = buffer.getvalue  # type: ignore[attr-defined]
    yield lines
    root.removeHandler(handler)
    for name, level in levels.items():
        logging.getLogger(name).setLevel(level)


async def test_the_turn_line_carries_the_request_the_turn_and_what_it_cost(make_agent, make_key, json_log):
    await orm(make_agent, name="logged")
    key = await orm(make_key)

    response = await Api(key).post("/api/v1/agents/logged/chat", {"message": "mail me at jane.doe@example.com"},
                                   headers={"X-Request-ID": "req-from-the-client-1"})

    assert response.status_code == 200
    body = response.json()
    lines = json_log()
    [turn] = [line for line in lines if line["logger"] == "agentplatform.turn"]
    assert turn["level"] == "INFO"
    assert turn["timestamp"].endswith("+00:00") and "T" in turn["timestamp"]
    assert turn["request_id"] == "req-from-the-client-1" == response.headers["X-Request-ID"]
    assert turn["run_id"] == body["id"]
    assert (turn["agent"], turn["transport"], turn["status"]) == ("logged", "rest", "succeeded")
    assert turn["key_prefix"] == key.split("_")[1]
    assert turn["latency_ms"] == body["latency_ms"]
    assert (turn["prompt_tokens"], turn["completion_tokens"]) == (body["usage"]["prompt_tokens"],
                                                                  body["usage"]["completion_tokens"])
    assert turn["cost_usd"] == body["cost_usd"]
    assert turn["model"] == "local/demo"
    assert body["id"] in turn["message"]
    [access] = [line for line in lines if line["logger"] == "agentplatform.access"]
    assert (access["method"], access["path"], access["status"]) == ("POST", "/api/v1/agents/logged/chat", 200)
    assert access["request_id"] == "req-from-the-client-1"
    # Nothing the caller sent that is personal, and never the key's secret.
    text = json_log.text()
    assert "jane.doe@example.com" not in text
    assert key not in text and key.split("_", 2)[2] not in text


async def test_a_refused_turn_is_logged_with_its_error(make_agent, make_key, json_log):
    await orm(make_agent, name="strict", rate_limit_rpm=1)
    key = await orm(make_key)

    await Api(key).post("/api/v1/agents/strict/chat", {"message": "one"})
    refused = await Api(key).post("/api/v1/agents/strict/chat", {"message": "two"})

    assert refused.status_code == 429
    turns = [line for line in json_log() if line["logger"] == "agentplatform.turn"]
    assert [t["status"] for t in turns] == ["succeeded", "refused"]
    assert turns[1]["error_code"] == "rate_limited"
    assert turns[1]["request_id"] == refused.headers["X-Request-ID"]


def test_every_field_is_masked_and_odd_values_are_written_as_text(json_log):
    logging.getLogger("tests.logging").warning(
        "call %s", "+1 415 555 0100", extra={"contact": "jane@example.com", "count": 3, "obj": object(),
                                             "key": "ap_0123456789ab_" + "s" * 30})

    [line] = [entry for entry in json_log() if entry["logger"] == "tests.logging"]
    assert "415 555 0100" not in line["message"]
    assert "jane@example.com" not in line["contact"] and line["count"] == 3
    assert line["obj"].startswith("<object object")
    assert "s" * 30 not in line["key"] and line["key"].startswith("ap_0123456789ab_")
    assert line["request_id"] == ""  # not serving a request
    assert "trace_id" not in line  # tracing is off


def test_an_exception_is_one_line_with_its_traceback(json_log):
    try:
        raise ValueError("broken for jane@example.com")
    except ValueError:
        logging.getLogger("tests.logging").exception("it broke")

    [line] = [entry for entry in json_log() if entry["logger"] == "tests.logging"]
    assert line["level"] == "ERROR"
    assert "ValueError" in line["exc_info"] and "jane@example.com" not in line["exc_info"]


# --- the settings and a real server -----------------------------------------------------------

PRINT = """
import django, logging
django.setup()
from django.conf import settings
print(settings.LOG_FORMAT, settings.LOGGING["handlers"]["console"]["formatter"], logging.getLogger().level)
"""


def _django(env: dict) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("LOG_", "OTEL_"))}
    return subprocess.run([sys.executable, "-c", PRINT], cwd=ROOT, env={**base, "DEBUG": "1", **env},
                          capture_output=True, text=True, timeout=60)


def test_log_format_and_level_come_from_the_environment():
    # Not a terminal (captured): JSON by default.
    assert _django({}).stdout.split() == ["json", "json", str(logging.INFO)]
    assert _django({"LOG_FORMAT": "text", "LOG_LEVEL": "warning"}).stdout.split() == \
        ["text", "text", str(logging.WARNING)]
    bad = _django({"LOG_FORMAT": "xml"})
    assert bad.returncode != 0 and "LOG_FORMAT must be json or text" in bad.stderr
    bad = _django({"LOG_LEVEL": "loud"})
    assert bad.returncode != 0 and "LOG_LEVEL must be" in bad.stderr


SETUP = """
import io, json
import django
django.setup()
from django.core.management import call_command
call_command("migrate", verbosity=0)
from agents.models import Agent
Agent.objects.create(name="talker", model="local/demo")
out = io.StringIO()
call_command("create_api_key", name="logs", role="client", json=True, stdout=out)
print(out.getvalue().strip().splitlines()[-1])
"""


@pytest.mark.slow
def test_a_server_writes_one_json_object_a_line(tmp_path):
    env = {k: v for k, v in os.environ.items()
           if k not in ("DATABASE_URL", "REDIS_URL", "CACHE_URL", "CELERY_BROKER_URL", "TEST_DATABASE_NAME",
                        "METRICS_TOKEN", "ALLOW_INSECURE_SECRET_KEY", "READ_DOT_ENV", "PROMETHEUS_MULTIPROC_DIR")
           and not k.startswith("OTEL_")}
    env.update(DJANGO_SETTINGS_MODULE="agentplatform.settings", DEBUG="0", SECRET_KEY=secrets.token_urlsafe(50),
               VAR_DIR=str(tmp_path), LOG_FORMAT="json", LOG_LEVEL="INFO")
    setup = subprocess.run([sys.executable, "-c", SETUP], cwd=ROOT, env=env, capture_output=True, text=True,
                           timeout=120)
    assert setup.returncode == 0, setup.stderr
    key = json.loads(setup.stdout.strip().splitlines()[-1])["key"]
    log_path = tmp_path / "daphne.log"
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with open(log_path, "wb") as log:  # -v 0: daphne's own access lines (plain text) off, as deployed
        process = subprocess.Popen([sys.executable, "-m", "daphne", "-v", "0", "-b", "127.0.0.1", "-p", str(port),
                                    "agentplatform.asgi:application"], cwd=ROOT, env=env, stdout=log,
                                   stderr=subprocess.STDOUT)
    try:
        wait_ready(process, url, log_path, time.monotonic() + 30)
        answer = httpx.post(f"{url}/api/v1/agents/talker/chat", json={"message": "reach me on +1 415 555 0100"},
                            headers={"Authorization": f"Bearer {key}"}, timeout=30)
        assert answer.status_code == 200
        missing = httpx.get(f"{url}/api/v1/agents/nobody", headers={"Authorization": f"Bearer {key}"}, timeout=10)
        assert missing.status_code == 404
    finally:
        stop_processes([process])
    text = log_path.read_text()
    lines = [json.loads(line) for line in text.splitlines() if line.strip()]  # every line is JSON
    turn = [line for line in lines if line.get("logger") == "agentplatform.turn"]
    assert len(turn) == 1 and turn[0]["run_id"] == answer.json()["id"]
    assert turn[0]["request_id"] == answer.headers["X-Request-ID"]
    access = {(line["path"], line["status"]) for line in lines if line.get("logger") == "agentplatform.access"}
    assert {("/api/v1/agents/talker/chat", 200), ("/api/v1/agents/nobody", 404)} <= access
    assert "/health" not in {path for path, _ in access}  # probes are DEBUG
    assert "415 555 0100" not in text and key not in text


def test_fields_our_code_makes_are_written_as_they_are_and_caller_input_still_masked(json_log):
    # The turn line's own fields are written as they are (not run through the masker: it cost ~8%
    # of a chat request's CPU); the path and request id come from the caller and stay masked.
    logging.getLogger("agentplatform.turn").info(
        "turn 5 echo rest succeeded", extra={"key_prefix": "415555010099", "model": "openai/gpt-4o-2024-08-06",
                                             "path": "/api/v1/agents/jane@example.com/chat",
                                             "request_id": "+1-415-555-0100"})

    [line] = [entry for entry in json_log() if entry["logger"] == "agentplatform.turn"]
    assert line["key_prefix"] == "415555010099" and line["model"] == "openai/gpt-4o-2024-08-06"
    assert line["message"] == "turn 5 echo rest succeeded"
    assert "jane@example.com" not in line["path"]
    assert "415-555-0100" not in line["request_id"]

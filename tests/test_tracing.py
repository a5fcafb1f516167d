"""OpenTelemetry traces (agentplatform.tracing): spans of real requests through the ASGI app,
captured with the SDK's in-memory exporter (the SDK's own test exporter: our code runs as it
does in production, only the export differs), their nesting and attributes; a real server
exporting over OTLP/HTTP to a collector the test runs; and nothing at all when OTEL is unset."""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from conftest import ROOT, Api, assert_error, free_port, orm, stop_processes, wait_ready
from test_websocket import turn_frames, ws

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def spans():
    """Tracing on, with an in-memory exporter; off again afterwards."""
    from agentplatform.tracing import tracing_disable, tracing_enable

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracing_enable(provider)
    yield exporter
    tracing_disable()
    provider.shutdown()


def tree(exporter) -> tuple[dict, dict]:
    """Spans by id, and each span's children (by parent id)."""
    found = exporter.get_finished_spans()
    by_id = {s.context.span_id: s for s in found}
    children: dict = {}
    for s in found:
        children.setdefault(s.parent.span_id if s.parent else None, []).append(s)
    return by_id, children


def named(exporter, prefix: str) -> list:
    return [s for s in exporter.get_finished_spans() if s.name.startswith(prefix)]


def parent_of(span, by_id):
    return by_id.get(span.parent.span_id) if span.parent else None


CALL = 'what is 6*7? [call:calculator {"expression": "6*7"}]'


async def test_a_request_nests_stages_the_run_its_model_calls_and_tools(make_agent, make_key, openai_settings,
                                                                        spans):
    await orm(make_agent, name="traced", model="openai/gpt-4o-mini", skills=["calculator"])
    key = await orm(make_key)

    response = await Api(key).post("/api/v1/agents/traced/chat", {"message": CALL},
                                   headers={"X-Request-ID": "req-traced-1"})

    assert response.status_code == 200
    by_id, children = tree(spans)
    [request] = [s for s in spans.get_finished_spans() if s.kind == SpanKind.SERVER]
    assert request.name == "POST /api/v1/agents/<str:name>/chat"
    assert request.attributes["http.route"] == "/api/v1/agents/<str:name>/chat"
    assert request.parent is None
    traces = {s.context.trace_id for s in spans.get_finished_spans()}
    assert traces == {request.context.trace_id}  # one trace for the whole request

    stages = [s.name for s in children[request.context.span_id] if s.name.startswith("stage ")]
    assert stages[:4] == ["stage MetricsStage.before", "stage ExperimentStage.before", "stage InputGuardStage.before",
                          "stage FeatureFlagStage.before"]
    assert "stage BudgetStage.before" in stages and "stage RateLimitStage.after" in stages
    [run] = named(spans, "agent.run")
    assert parent_of(run, by_id) is request
    assert run.attributes["gen_ai.agent.name"] == "traced"
    assert run.attributes["agent.steps"] == 2

    calls = sorted(named(spans, "llm.call"), key=lambda s: s.start_time)
    assert [c.name for c in calls] == ["llm.call openai/gpt-4o-mini"] * 2
    for call in calls:
        assert parent_of(call, by_id) is run
        assert call.attributes["gen_ai.request.model"] == "openai/gpt-4o-mini"
        assert call.attributes["llm.attempt"] == 1 and call.attributes["llm.fallback"] is False
        assert call.attributes["llm.outcome"] == "ok"
        assert call.attributes["gen_ai.usage.input_tokens"] > 0 and "gen_ai.usage.output_tokens" in call.attributes
        assert call.attributes["llm.first_token_ms"] >= 0
        # The upstream HTTP request (the SDK's aiohttp transport, instrumented) is the call's child.
        [upstream] = children[call.context.span_id]
        assert upstream.kind == SpanKind.CLIENT and upstream.name.startswith("POST")
    [tool] = named(spans, "tool calculator")
    assert parent_of(tool, by_id) is run
    assert tool.attributes["tool.is_error"] is False
    assert calls[0].end_time <= tool.start_time <= calls[1].start_time
    assert sum(run.attributes[f"gen_ai.usage.{k}_tokens"] for k in ("input", "output")) == \
        response.json()["usage"]["total_tokens"]


async def test_retries_and_fallbacks_are_calls_of_their_own(make_agent, make_key, openai_settings, spans):
    openai_settings.LLM_MAX_RETRIES = 1
    openai_settings.LLM_RETRY_BASE_SECONDS = 0.01
    openai_settings.CIRCUIT_FAILURE_THRESHOLD = 0
    await orm(make_agent, name="fallsback", model="openai/tracing-fault-500", fallback_models=["openai/gpt-4o-mini"])
    key = await orm(make_key)

    response = await Api(key).post("/api/v1/agents/fallsback/chat", {"message": "hi"})

    assert response.status_code == 200
    calls = sorted(named(spans, "llm.call"), key=lambda s: s.start_time)
    assert [(c.attributes["gen_ai.request.model"], c.attributes["llm.attempt"], c.attributes["llm.fallback"],
             c.attributes["llm.outcome"]) for c in calls] == [
        ("openai/tracing-fault-500", 1, False, "upstream_error"),
        ("openai/tracing-fault-500", 2, False, "upstream_error"),
        ("openai/gpt-4o-mini", 1, True, "ok")]
    assert calls[0].status.status_code == StatusCode.ERROR
    assert calls[0].attributes["error.type"] == "upstream_error"
    assert calls[2].status.status_code != StatusCode.ERROR


async def test_a_refused_turn_and_a_failed_run_are_marked(make_agent, make_key, openai_settings, spans):
    await orm(make_agent, name="down", model="openai/tracing-fault-503")
    openai_settings.LLM_MAX_RETRIES = 0
    key = await orm(make_key)

    assert_error(await Api(key).post("/api/v1/agents/down/chat", {"message": "hi"}), 502)

    [run] = named(spans, "agent.run")
    assert run.status.status_code == StatusCode.ERROR and run.attributes["error.type"] == "upstream_error"
    [request] = [s for s in spans.get_finished_spans() if s.kind == SpanKind.SERVER]
    assert request.attributes["http.status_code"] == 502 or request.attributes.get("http.response.status_code") == 502


async def test_a_streamed_request_span_lasts_until_the_stream_ends(make_agent, make_key, openai_settings, spans):
    await orm(make_agent, name="streamer", model="openai/gpt-4o-mini")
    key = await orm(make_key)

    response = await Api(key).post("/api/v1/agents/streamer/chat", {"message": "[tokens:3] [gap:100]",
                                                                    "stream": True})

    assert response.status_code == 200
    by_id, _ = tree(spans)
    [request] = [s for s in spans.get_finished_spans() if s.kind == SpanKind.SERVER]
    [run] = named(spans, "agent.run")
    assert parent_of(run, by_id) is request  # read ahead in a task of its own, still this request's
    assert run.end_time <= request.end_time
    [call] = named(spans, "llm.call")
    assert call.attributes["llm.first_token_ms"] < (call.end_time - call.start_time) / 1e6


async def test_a_websocket_turn_is_a_trace_of_its_own(make_agent, make_key, spans):
    await orm(make_agent, name="wstraced", skills=["calculator"])
    key = await orm(make_key)

    async with ws("wstraced", key) as communicator:
        await communicator.send_json_to({"type": "message", "content": "What is 2 + 3?"})
        frames = await turn_frames(communicator)

    assert frames[-1]["type"] == "done"
    by_id, _ = tree(spans)
    [turn] = named(spans, "websocket turn")
    assert turn.parent is None and turn.attributes["gen_ai.agent.name"] == "wstraced"
    [run] = named(spans, "agent.run")
    assert parent_of(run, by_id) is turn
    assert {parent_of(s, by_id).name for s in named(spans, "llm.call")} == {"agent.run"}
    assert all(parent_of(s, by_id) is turn for s in named(spans, "stage "))


async def test_log_records_carry_the_trace_id(make_agent, make_key, spans, caplog):
    import logging

    await orm(make_agent, name="correlated")
    key = await orm(make_key)
    from agentplatform.logs import ContextFilter

    # On the logger itself: when this test runs first in its process, django.setup() (the ASGI
    # app's first import) configures logging after caplog put its handler on the root logger.
    turn_logger = logging.getLogger("agentplatform.turn")
    turn_logger.addHandler(caplog.handler)
    caplog.handler.addFilter(ContextFilter())
    try:
        with caplog.at_level(logging.INFO, logger="agentplatform.turn"):
            response = await Api(key).post("/api/v1/agents/correlated/chat", {"message": "hi"})
    finally:
        turn_logger.removeHandler(caplog.handler)

    # (Seen once or twice: also through the root logger when caplog's handler is still there.)
    [record] = {id(r): r for r in caplog.records if r.name == "agentplatform.turn"}.values()
    [request] = [s for s in spans.get_finished_spans() if s.kind == SpanKind.SERVER]
    assert record.trace_id == format(request.context.trace_id, "032x")
    assert record.run_id == response.json()["id"]


# --- off ---------------------------------------------------------------------------------------

PROBE = """
import django
django.setup()
from opentelemetry import trace
from agentplatform import tracing
print(type(trace.get_tracer_provider()).__name__, tracing.enabled())
"""


def _probe(env: dict) -> str:
    base = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    done = subprocess.run([sys.executable, "-c", PROBE], cwd=ROOT, env={**base, "DEBUG": "1", **env},
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_without_an_endpoint_no_tracer_provider_is_installed():
    assert _probe({}) == "ProxyTracerProvider False"
    assert _probe({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318"}) == "TracerProvider True"
    assert _probe({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318", "OTEL_SDK_DISABLED": "true"}) == \
        "ProxyTracerProvider False"


async def test_off_nothing_is_wrapped(make_agent, make_key):
    from agentplatform import tracing
    from agents.runtime import AgentRun
    from agents.selectors import agent_entry_from_db, agent_spec_from_entry

    assert not tracing.enabled()
    agent = agent_spec_from_entry(await orm(lambda: agent_entry_from_db((make_agent(name="plain")).name)))
    run = AgentRun(agent=agent, messages=[{"role": "user", "content": "hi"}], stream=False)
    events = run.events()
    assert events.__qualname__ == "AgentRun._events"  # the loop itself, no tracing layer
    await events.aclose()
    assert tracing.span("x") is tracing.span("y")  # one shared no-op


# --- a real server exporting over OTLP/HTTP ---------------------------------------------------


class Collector:
    """An OTLP/HTTP trace receiver: decodes each POST /v1/traces (protobuf) into its spans."""

    def __init__(self) -> None:
        from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

        collected = self.spans = []

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                body = self.rfile.read(int(self.headers["Content-Length"]))
                request = ExportTraceServiceRequest()
                request.ParseFromString(body)
                for resource in request.resource_spans:
                    service = {a.key: a.value.string_value for a in resource.resource.attributes}["service.name"]
                    for scope in resource.scope_spans:
                        for s in scope.spans:
                            collected.append({"name": s.name, "trace_id": s.trace_id.hex(), "service": service,
                                              "path": self.path})
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


SETUP = """
import io, json
import django
django.setup()
from django.core.management import call_command
call_command("migrate", verbosity=0)
from agents.models import Agent
Agent.objects.create(name="exported", model="local/demo")
out = io.StringIO()
call_command("create_api_key", name="otel", role="client", json=True, stdout=out)
print(out.getvalue().strip().splitlines()[-1])
"""


@pytest.mark.slow
def test_a_server_exports_its_spans_over_otlp_with_the_trace_id_in_its_json_logs(tmp_path):
    collector = Collector()
    env = {k: v for k, v in os.environ.items()
           if k not in ("DATABASE_URL", "REDIS_URL", "CACHE_URL", "CELERY_BROKER_URL", "TEST_DATABASE_NAME",
                        "METRICS_TOKEN", "ALLOW_INSECURE_SECRET_KEY", "READ_DOT_ENV", "PROMETHEUS_MULTIPROC_DIR")
           and not k.startswith("OTEL_")}
    env.update(DJANGO_SETTINGS_MODULE="agentplatform.settings", DEBUG="0", SECRET_KEY=secrets.token_urlsafe(50),
               VAR_DIR=str(tmp_path), LOG_FORMAT="json", LOG_LEVEL="INFO",
               OTEL_EXPORTER_OTLP_ENDPOINT=collector.url, OTEL_SERVICE_NAME="platform-under-test",
               OTEL_BSP_SCHEDULE_DELAY="100")
    try:
        setup = subprocess.run([sys.executable, "-c", SETUP], cwd=ROOT, env=env, capture_output=True, text=True,
                               timeout=120)
        assert setup.returncode == 0, setup.stderr
        key = json.loads(setup.stdout.strip().splitlines()[-1])["key"]
        collector.spans.clear()  # the setup's own (none expected, but not this test's business)
        log_path = tmp_path / "daphne.log"
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        with open(log_path, "wb") as log:
            process = subprocess.Popen([sys.executable, "-m", "daphne", "-v", "0", "-b", "127.0.0.1", "-p", str(port),
                                        "agentplatform.asgi:application"], cwd=ROOT, env=env, stdout=log,
                                       stderr=subprocess.STDOUT)
        try:
            wait_ready(process, url, log_path, time.monotonic() + 30)
            answer = httpx.post(f"{url}/api/v1/agents/exported/chat", json={"message": "hi"},
                                headers={"Authorization": f"Bearer {key}"}, timeout=30)
            assert answer.status_code == 200
            deadline = time.monotonic() + 15
            while not any(s["name"].startswith("llm.call") for s in collector.spans):
                assert time.monotonic() < deadline, f"no spans exported: {log_path.read_text()[-2000:]}"
                time.sleep(0.1)
        finally:
            stop_processes([process])
    finally:
        collector.close()
    names = {s["name"] for s in collector.spans}
    assert {"POST /api/v1/agents/<str:name>/chat", "agent.run", "llm.call local/demo",
            "stage MetricsStage.before"} <= names
    assert {s["service"] for s in collector.spans} == {"platform-under-test"}
    assert {s["path"] for s in collector.spans} == {"/v1/traces"}
    [trace_id] = {s["trace_id"] for s in collector.spans if s["name"] == "agent.run"}
    lines = [json.loads(line) for line in log_path.read_text().splitlines() if line.strip()]
    [turn] = [line for line in lines if line.get("logger") == "agentplatform.turn"]
    assert turn["trace_id"] == trace_id and len(turn["span_id"]) == 16
    assert {line["trace_id"] for line in lines if line.get("logger") == "agentplatform.access"} == {trace_id}

"""Resilience of model calls, from the outside: retries that honour the upstream's Retry-After
and never repeat a request the upstream refused as bad, circuit breakers that stop calling a
failing model (skipped at once, probed after the cool-down, shared by workers through Redis,
per process when Redis is gone), and one deadline per run across retries, fallbacks, tool
steps and streams. Requests go through the real ASGI app to the fake upstream, whose
`[fault:...]`, `[fault-times:N]`, `[retry-after:N]`, `[latency:MS]` and `[gap:MS]` directives
script the failures and `/_stats` counts what reached it."""

from __future__ import annotations

import asyncio
import ipaddress
import threading
import time
from datetime import datetime, timezone
from email.utils import format_datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest

from agents.models import Run, Skill
from agents.providers.openai_compat import retry_after_seconds
from conftest import Api, assert_error, orm, parse_sse
from test_ratelimit import start_workers  # noqa: F401  (a fixture)

pytestmark = pytest.mark.django_db(transaction=True)

CHAT = "/api/v1/agents/{}/chat"
# Deadlines are measured from outside: the request's own overhead fits in this.
MARGIN = 1.0


@pytest.fixture
def key(make_key) -> str:
    return make_key()


@pytest.fixture
def quick_backoff(settings):
    """Backoff jitter of a few milliseconds: a wait a test measures is then the upstream's."""
    settings.LLM_RETRY_BASE_SECONDS = 0.01
    return settings


def calls_of(run: Run) -> list[tuple[str, bool, str]]:
    return [(c["model"], c["ok"], c["error"]) for c in run.metadata["calls"]]


def sse_events(response: httpx.Response) -> list[dict]:
    return [e["data"] for e in parse_sse(response.text) if "event" in e]


async def timed(coroutine) -> tuple[httpx.Response, float]:
    started = time.monotonic()
    response = await coroutine
    return response, time.monotonic() - started


# --- retries ------------------------------------------------------------------------------


async def test_it_retries_a_429_after_its_retry_after_and_answers(make_agent, key, openai_settings, quick_backoff,
                                                                 fake_upstream):
    await orm(make_agent, name="gpt", model="openai/gpt-4o-mini")

    response, elapsed = await timed(Api(key).post(CHAT.format("gpt"), {
        "message": "hi [fault:429] [retry-after:1] [fault-times:1]"}))

    assert response.status_code == 200, response.text
    assert response.json()["output"] == "Echo: hi"
    assert elapsed >= 1.0  # the retry waited for the upstream's Retry-After
    run = await orm(Run.objects.get, pk=response.json()["id"])
    assert run.status == Run.Status.SUCCEEDED and run.steps == 2
    assert calls_of(run) == [("openai/gpt-4o-mini", False, "upstream_rate_limited"), ("openai/gpt-4o-mini", True, "")]
    assert fake_upstream.stats()["requests"] == 2


async def test_it_honours_retry_after_ms(make_agent, key, openai_settings, quick_backoff, fake_upstream):
    await orm(make_agent, name="gpt", model="openai/gpt-4o-mini")

    response, elapsed = await timed(Api(key).post(CHAT.format("gpt"), {
        "message": "hi [fault:503] [retry-after-ms:400] [fault-times:1]"}))

    assert response.status_code == 200, response.text
    assert elapsed >= 0.4
    assert fake_upstream.stats()["requests"] == 2


def test_it_reads_retry_after_as_seconds_milliseconds_or_an_http_date():
    now = datetime(2030, 5, 6, 7, 8, 9, tzinfo=timezone.utc).timestamp()
    in_two_minutes = format_datetime(datetime.fromtimestamp(now + 120, timezone.utc), usegmt=True)

    assert retry_after_seconds(httpx.Headers({"Retry-After": "7"}), now=now) == 7
    assert retry_after_seconds(httpx.Headers({"Retry-After": "1.5"}), now=now) == 1.5
    assert retry_after_seconds(httpx.Headers({"Retry-After": in_two_minutes}), now=now) == 120
    assert retry_after_seconds(httpx.Headers({"retry-after-ms": "250", "Retry-After": "9"}), now=now) == 0.25
    past = format_datetime(datetime.fromtimestamp(now - 5, timezone.utc), usegmt=True)
    for value in ("soon", "-3", "nan", past):
        assert retry_after_seconds(httpx.Headers({"Retry-After": value}), now=now) is None
    assert retry_after_seconds(httpx.Headers({}), now=now) is None


async def test_it_retries_a_server_error_with_backoff_then_falls_back(make_agent, key, openai_settings,
                                                                      fake_upstream):
    await orm(make_agent, name="gpt", model="openai/fault-500-primary", fallback_models=["openai/backup"])

    response = await Api(key).post(CHAT.format("gpt"), {"message": "hi"})

    assert response.status_code == 200 and response.json()["model"] == "openai/backup"
    run = await orm(Run.objects.get, pk=response.json()["id"])
    assert calls_of(run) == [("openai/fault-500-primary", False, "upstream_error")] * 3 + [("openai/backup", True, "")]
    assert fake_upstream.stats()["by_model"] == {"fault-500-primary": 3, "backup": 1}


@pytest.mark.parametrize("status", [400, 401, 404, 422])
async def test_it_never_retries_a_request_the_upstream_refused(make_agent, key, openai_settings, fake_upstream,
                                                               status):
    await orm(make_agent, name="gpt", model="openai/gpt-4o-mini")

    response = await Api(key).post(CHAT.format("gpt"), {"message": f"hi [fault:{status}]"})

    assert_error(response, 502, "upstream_error")
    assert fake_upstream.stats()["requests"] == 1
    run = await orm(Run.objects.get, agent__name="gpt")
    assert run.steps == 1


async def test_an_agents_max_retries_overrides_the_setting(make_agent, key, openai_settings, fake_upstream):
    await orm(make_agent, name="once", model="openai/gpt-4o-mini", max_retries=0)
    await orm(make_agent, name="twice", model="openai/gpt-4o-mini", max_retries=1)

    assert_error(await Api(key).post(CHAT.format("once"), {"message": "a [fault:500]"}), 502, "upstream_error")
    assert fake_upstream.stats()["requests"] == 1
    assert_error(await Api(key).post(CHAT.format("twice"), {"message": "b [fault:500]"}), 502, "upstream_error")
    assert fake_upstream.stats()["requests"] == 3


async def test_max_retries_is_part_of_an_agents_definition(make_key):
    developer = await orm(make_key, role="developer")
    api = Api(developer)

    created = await api.post("/api/v1/agents", {"name": "patient", "model": "local/demo", "max_retries": 4})
    assert created.status_code == 201, created.text
    assert created.json()["max_retries"] == 4
    reset = await api.request("PATCH", "/api/v1/agents/patient", json={"max_retries": None})
    assert reset.status_code == 200 and reset.json()["max_retries"] is None
    assert_error(await api.request("PATCH", "/api/v1/agents/patient", json={"max_retries": 11}), 400,
                 "invalid_agent", param="max_retries")
    assert_error(await api.request("PATCH", "/api/v1/agents/patient", json={"max_retries": "3"}), 400,
                 "invalid_agent", param="max_retries")


async def test_a_stream_is_retried_before_its_first_token(make_agent, key, openai_settings, fake_upstream):
    await orm(make_agent, name="gpt", model="openai/gpt-4o-mini")

    response = await Api(key).post(CHAT.format("gpt"), {"message": "hi [fault:500] [fault-times:1]", "stream": True})

    events = sse_events(response)
    assert [e["type"] for e in events] == ["start", "delta", "delta", "usage", "done"]
    assert events[-1]["output"] == "Echo: hi"
    assert fake_upstream.stats()["requests"] == 2


async def test_a_stream_without_a_first_token_in_time_is_retried_then_fails(make_agent, key, openai_settings,
                                                                           fake_upstream):
    openai_settings.LLM_FIRST_TOKEN_TIMEOUT_SECONDS = 0.3
    await orm(make_agent, name="gpt", model="openai/gpt-4o-mini")

    # The fake sends its role chunk at once and the first word 1 s later (each attempt).
    response = await Api(key).post(CHAT.format("gpt"), {"message": "[tokens:2] [gap:1000]", "stream": True})

    # Nothing was answered, so the stream never started: a real 504 with our JSON error body.
    error = assert_error(response, 504, "upstream_timeout")
    assert "first token" in error["message"]
    assert fake_upstream.stats()["requests"] == 3  # the call and its two retries


async def test_a_stream_is_not_retried_once_a_token_reached_the_client(make_agent, key, openai_settings,
                                                                      fake_upstream):
    openai_settings.LLM_STREAM_IDLE_TIMEOUT_SECONDS = 0.3
    await orm(make_agent, name="gpt", model="openai/gpt-4o-mini", fallback_models=["openai/backup"])

    # The first word comes after 1 s (within the first-token limit), the next one 1 s later: the
    # idle limit ends the stream after that first word.
    response = await Api(key).post(CHAT.format("gpt"), {"message": "[tokens:3] [gap:1000]", "stream": True})

    events = sse_events(response)
    assert [e["type"] for e in events][:2] == ["start", "delta"]
    error = events[-1]
    assert error["type"] == "error" and error["code"] == "upstream_timeout" and error["status"] == 504
    assert fake_upstream.stats()["by_model"] == {"gpt-4o-mini": 1}  # neither retried nor fallen back
    run = await orm(Run.objects.get, pk=error["run_id"])
    assert run.status == Run.Status.FAILED


# --- circuit breakers ---------------------------------------------------------------------


async def agent_health(key: str, name: str) -> httpx.Response:
    return await Api(key).get(f"/api/v1/agents/{name}/health")


async def test_a_failing_model_opens_its_circuit_and_is_skipped(make_agent, key, openai_settings, fake_upstream):
    openai_settings.CIRCUIT_FAILURE_THRESHOLD = 3
    openai_settings.LLM_MAX_RETRIES = 0
    await orm(make_agent, name="gpt", model="openai/fault-500-sick", fallback_models=["openai/gpt-4o-mini"])
    api = Api(key)

    for _ in range(5):
        response = await api.post(CHAT.format("gpt"), {"message": "hi"})
        assert response.status_code == 200 and response.json()["model"] == "openai/gpt-4o-mini"

    # Three failures opened the circuit; the next two requests did not call the sick model.
    assert fake_upstream.stats()["by_model"] == {"fault-500-sick": 3, "gpt-4o-mini": 5}
    skipped = await orm(lambda: list(Run.objects.order_by("started_at"))[-1])
    assert calls_of(skipped) == [("openai/gpt-4o-mini", True, "")]

    health = await agent_health(key, "gpt")
    assert health.status_code == 200 and health.json()["status"] == "degraded"
    sick, good = health.json()["models"]
    assert sick["available"] is False and sick["circuit"]["state"] == "open" and sick["circuit"]["failures"] == 3
    retry_at = datetime.fromisoformat(sick["circuit"]["retry_at"].replace("Z", "+00:00"))
    assert 0 < (retry_at - datetime.now(timezone.utc)).total_seconds() <= 30
    assert good["circuit"] == {"state": "closed", "failures": 0, "retry_at": None}

    ready = await Api().get("/health/ready")
    assert ready.status_code == 200  # an open circuit is reported, not a reason to leave the load balancer
    circuits = ready.json()["checks"]["circuits"]
    assert circuits["status"] == "degraded"
    assert [c["model"] for c in circuits["open"]] == ["openai/fault-500-sick"]
    assert circuits["open"][0]["state"] == "open"


async def test_an_open_circuit_without_a_fallback_answers_503_until_its_probe_closes_it(
        make_agent, key, openai_settings, fake_upstream):
    openai_settings.CIRCUIT_FAILURE_THRESHOLD = 2
    openai_settings.CIRCUIT_COOLDOWN_SECONDS = 1
    openai_settings.LLM_MAX_RETRIES = 0
    await orm(make_agent, name="gpt", model="openai/flaky")
    api = Api(key)
    # The first two requests with this message fail; the upstream answers from the third on.
    ask = {"message": "hello [fault:500] [fault-times:2]"}

    for _ in range(2):
        assert_error(await api.post(CHAT.format("gpt"), ask), 502, "upstream_error")
    refused = await api.post(CHAT.format("gpt"), ask)
    error = assert_error(refused, 503, "circuit_open")
    assert refused.headers["Retry-After"] == "1"
    assert error["details"] == {"model": "openai/flaky", "retry_after_seconds": 1}
    streamed = await api.post(CHAT.format("gpt"), {**ask, "stream": True})  # refused before any stream
    assert_error(streamed, 503, "circuit_open")
    assert streamed.headers["Retry-After"] == "1"
    assert fake_upstream.stats()["requests"] == 2  # refused without calling the upstream
    health = await agent_health(key, "gpt")
    assert health.status_code == 503 and health.json()["status"] == "unavailable"
    run = await orm(lambda: Run.objects.filter(error_code="circuit_open").order_by("started_at").first())
    assert run.status == Run.Status.FAILED and run.model == "openai/flaky" and run.steps == 0

    await asyncio.sleep(1.1)  # the cool-down
    assert (await agent_health(key, "gpt")).json()["models"][0]["circuit"]["state"] == "half_open"
    probe = await api.post(CHAT.format("gpt"), ask)

    assert probe.status_code == 200, probe.text
    assert fake_upstream.stats()["requests"] == 3
    health = await agent_health(key, "gpt")
    assert health.json()["status"] == "ok"
    assert health.json()["models"][0]["circuit"] == {"state": "closed", "failures": 0, "retry_at": None}
    assert (await Api().get("/health/ready")).json()["checks"]["circuits"]["open"] == []


async def test_a_failed_probe_opens_the_circuit_again(make_agent, key, openai_settings, fake_upstream):
    openai_settings.CIRCUIT_FAILURE_THRESHOLD = 1
    openai_settings.CIRCUIT_COOLDOWN_SECONDS = 1
    openai_settings.LLM_MAX_RETRIES = 0
    await orm(make_agent, name="gpt", model="openai/fault-502-down")
    api = Api(key)

    assert_error(await api.post(CHAT.format("gpt"), {"message": "a"}), 502)
    await asyncio.sleep(1.1)
    assert_error(await api.post(CHAT.format("gpt"), {"message": "b"}), 502)  # the probe
    assert_error(await api.post(CHAT.format("gpt"), {"message": "c"}), 503, "circuit_open")

    assert fake_upstream.stats()["requests"] == 2
    circuit = (await agent_health(key, "gpt")).json()["models"][0]["circuit"]
    assert circuit["state"] == "open" and circuit["failures"] == 2


async def test_a_half_open_circuit_lets_one_probe_through(make_agent, key, openai_settings, fake_upstream):
    openai_settings.CIRCUIT_FAILURE_THRESHOLD = 1
    openai_settings.CIRCUIT_COOLDOWN_SECONDS = 1
    openai_settings.LLM_MAX_RETRIES = 0
    await orm(make_agent, name="gpt", model="openai/gpt-4o-mini")
    api = Api(key)
    assert_error(await api.post(CHAT.format("gpt"), {"message": "boom [fault:500]"}), 502)
    await asyncio.sleep(1.1)

    # Two requests at once after the cool-down: the probe (slow, 300 ms) and one refused meanwhile.
    responses = await asyncio.gather(*(api.post(CHAT.format("gpt"), {"message": "slow [latency:300]"})
                                       for _ in range(2)))

    assert sorted(r.status_code for r in responses) == [200, 503]
    assert fake_upstream.stats()["requests"] == 2


async def test_a_request_the_upstream_refused_does_not_count_against_the_circuit(make_agent, key, openai_settings,
                                                                                fake_upstream):
    openai_settings.CIRCUIT_FAILURE_THRESHOLD = 1
    await orm(make_agent, name="gpt", model="openai/gpt-4o-mini")

    for _ in range(3):
        assert_error(await Api(key).post(CHAT.format("gpt"), {"message": "bad [fault:400]"}), 502)

    assert fake_upstream.stats()["requests"] == 3
    circuit = (await agent_health(key, "gpt")).json()["models"][0]["circuit"]
    assert circuit == {"state": "closed", "failures": 0, "retry_at": None}


async def test_a_requests_retries_count_once_against_the_circuit(make_agent, key, openai_settings, fake_upstream):
    """One request failing on its own (retried twice) is one failure, not three: it must not
    open the model's circuit for every other caller; a second failing request does."""
    openai_settings.CIRCUIT_FAILURE_THRESHOLD = 2
    openai_settings.LLM_MAX_RETRIES = 2
    openai_settings.LLM_RETRY_BASE_SECONDS = 0.01
    await orm(make_agent, name="gpt", model="openai/gpt-4o-mini")

    assert_error(await Api(key).post(CHAT.format("gpt"), {"message": "one [fault:500]"}), 502)

    assert fake_upstream.stats()["requests"] == 3
    circuit = (await agent_health(key, "gpt")).json()["models"][0]["circuit"]
    assert (circuit["state"], circuit["failures"]) == ("closed", 1)

    assert_error(await Api(key).post(CHAT.format("gpt"), {"message": "two [fault:500]"}), 502)

    assert fake_upstream.stats()["requests"] == 4  # its first failure opened the circuit: no retry
    circuit = (await agent_health(key, "gpt")).json()["models"][0]["circuit"]
    assert (circuit["state"], circuit["failures"]) == ("open", 2)


async def test_circuits_live_in_the_process_when_redis_is_unreachable(make_agent, key, openai_settings,
                                                                      fake_upstream):
    openai_settings.REDIS_URL = "redis://127.0.0.1:1/0"  # nothing listens there
    openai_settings.CIRCUIT_FAILURE_THRESHOLD = 1
    openai_settings.LLM_MAX_RETRIES = 0
    await orm(make_agent, name="gpt", model="openai/fault-500-gone", fallback_models=["openai/gpt-4o-mini"])

    for _ in range(3):
        response = await Api(key).post(CHAT.format("gpt"), {"message": "hi"})
        assert response.status_code == 200, response.text

    assert fake_upstream.stats()["by_model"] == {"fault-500-gone": 1, "gpt-4o-mini": 3}
    health = await agent_health(key, "gpt")
    assert health.status_code == 200 and health.json()["models"][0]["circuit"]["state"] == "open"


@pytest.mark.redis
@pytest.mark.slow
async def test_two_workers_share_a_circuit_through_redis(start_workers, fake_upstream):  # noqa: F811
    settings = {"CIRCUIT_FAILURE_THRESHOLD": "2", "LLM_MAX_RETRIES": "0", "CIRCUIT_COOLDOWN_SECONDS": "60"}
    workers = start_workers(agents=[{"name": "gpt", "model": "openai/fault-500-shared",
                                     "fallback_models": ["openai/gpt-4o-mini"]}], keys=[{}], settings=settings)
    fake_upstream.reset()
    headers = {"Authorization": f"Bearer {workers.keys[0]}"}
    first, second = workers.urls

    async with httpx.AsyncClient(timeout=30) as client:
        for _ in range(2):  # two failures on the first worker open the circuit
            response = await client.post(f"{first}{CHAT.format('gpt')}", json={"message": "hi"}, headers=headers)
            assert response.status_code == 200, workers.log_tail()
        for _ in range(3):  # the second worker skips the model at once
            response = await client.post(f"{second}{CHAT.format('gpt')}", json={"message": "hi"}, headers=headers)
            assert response.status_code == 200 and response.json()["model"] == "openai/gpt-4o-mini"
        health = await client.get(f"{second}/api/v1/agents/gpt/health", headers=headers)
        ready = await client.get(f"{second}/health/ready")

    assert fake_upstream.stats()["by_model"] == {"fault-500-shared": 2, "gpt-4o-mini": 5}
    assert health.json()["models"][0]["circuit"]["state"] == "open"
    assert [c["model"] for c in ready.json()["checks"]["circuits"]["open"]] == ["openai/fault-500-shared"]


# --- one deadline per run -----------------------------------------------------------------


async def test_a_hanging_model_and_its_fallback_share_one_deadline(make_agent, key, openai_settings, fake_upstream):
    await orm(make_agent, name="gpt", model="openai/fault-hang-a", fallback_models=["openai/fault-hang-b"],
              timeout_seconds=2)

    response, elapsed = await timed(Api(key).post(CHAT.format("gpt"), {"message": "hi"}))

    assert_error(response, 504, "timeout")
    assert 2 <= elapsed < 2 + MARGIN
    run = await orm(Run.objects.get, agent__name="gpt")
    assert run.status == Run.Status.FAILED and run.error_code == "timeout"


async def test_a_hanging_stream_ends_with_a_timeout_within_the_deadline(make_agent, key, openai_settings):
    await orm(make_agent, name="gpt", model="openai/fault-hang-a", fallback_models=["openai/fault-hang-b"],
              timeout_seconds=2)

    response, elapsed = await timed(Api(key).post(CHAT.format("gpt"), {"message": "hi", "stream": True}))

    # No model answered within the deadline (shorter than SSE_HEARTBEAT_SECONDS): the stream
    # never started, so it is a real 504 with our JSON error body.
    assert_error(response, 504, "timeout")
    assert elapsed < 2 + MARGIN


async def test_a_long_stream_is_cut_at_the_deadline_with_its_partial_output_kept(make_agent, key, openai_settings):
    await orm(make_agent, name="gpt", model="openai/gpt-4o-mini", timeout_seconds=1)

    # 20 words 200 ms apart would take 4 s.
    response, elapsed = await timed(Api(key).post(CHAT.format("gpt"), {"message": "[tokens:20] [gap:200]",
                                                                       "stream": True}))

    events = sse_events(response)
    assert events[-1]["type"] == "error" and events[-1]["code"] == "timeout"
    deltas = [e["content"] for e in events if e["type"] == "delta"]
    assert 0 < len(deltas) < 20
    assert elapsed < 1 + MARGIN
    run = await orm(Run.objects.get, pk=events[-1]["run_id"])
    assert run.status == Run.Status.FAILED and run.error_code == "timeout"
    stored = await orm(lambda: list(run.messages.filter(role="assistant").values_list("content", flat=True)))
    assert stored == ["".join(deltas)]


async def test_retries_stop_at_the_deadline(make_agent, key, openai_settings, fake_upstream):
    await orm(make_agent, name="gpt", model="openai/gpt-4o-mini", timeout_seconds=2, max_retries=10)

    # Each call fails after 700 ms: the deadline leaves room for three at most, not eleven.
    response, elapsed = await timed(Api(key).post(CHAT.format("gpt"), {"message": "x [fault:500] [latency:700]"}))

    assert response.status_code in (502, 504), response.text
    assert elapsed < 2 + MARGIN
    assert fake_upstream.stats()["requests"] <= 3


class _SlowTool(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:
        pass

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        time.sleep(5)
        body = b"too late"
        try:
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        except OSError:
            pass  # the platform gave up on us


@pytest.fixture
def slow_tool(settings):
    server = ThreadingHTTPServer(("127.0.0.1", 0), _SlowTool)
    server.daemon_threads = True
    server.block_on_close = False
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    settings.HTTP_FETCH_ALLOW_PRIVATE_NETWORKS = (ipaddress.ip_network("127.0.0.1/32"),)
    yield f"http://127.0.0.1:{server.server_address[1]}/tool"
    server.shutdown()
    server.server_close()


async def test_a_tool_step_counts_against_the_deadline(make_agent, key, openai_settings, slow_tool):
    await orm(Skill.objects.create, name="slow", kind=Skill.Kind.HTTP, config={"url": slow_tool},
              parameters={"type": "object", "properties": {}})
    await orm(make_agent, name="gpt", model="openai/gpt-4o-mini", skills=["slow"], timeout_seconds=2)

    response, elapsed = await timed(Api(key).post(CHAT.format("gpt"), {"message": "go [call:slow {}]"}))

    assert_error(response, 504, "timeout")
    assert elapsed < 2 + MARGIN
    run = await orm(Run.objects.get, agent__name="gpt")
    assert run.status == Run.Status.FAILED and run.metadata["calls"][0]["ok"] is True  # the model had answered

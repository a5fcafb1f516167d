"""Rate limits: the sliding-window logic (Redis' Lua script and the cache fallback, driven with
an explicit clock), the 429 path over HTTP, token and per-agent limits, and — against Redis
with two Daphne worker processes — that several workers together admit exactly the limit."""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import subprocess
import sys
import time
import uuid
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import httpx
import pytest
from django.conf import settings as django_settings
from django.core.cache.backends.locmem import LocMemCache
from django.db import connection

from agents.models import Run
from agentplatform.errors import PermissionDenied
from conftest import ROOT, Api, assert_error, orm, spawn_daphne, stop_processes, wait_ready
from governance.models import ApiKey
from governance.ratelimit import REQUESTS, TOKENS, WINDOW_MS, CacheWindow, Limit, RedisWindow
from governance.services import split_key

pytestmark = pytest.mark.django_db(transaction=True)

CHAT = "/api/v1/agents/{}/chat"


# --- the window logic, with an explicit clock (ms) -----------------------------------------


@pytest.fixture(params=["cache", "redis"])
def window(request):
    """Each backend of the sliding logs: the cache fallback always, Redis' Lua script when
    REDIS_URL is set."""
    if request.param == "redis":
        if not django_settings.REDIS_URL:
            pytest.skip("the Lua script needs Redis: set REDIS_URL")
        return RedisWindow(django_settings.REDIS_URL)
    return CacheWindow(LocMemCache(f"rl-{uuid.uuid4().hex}", {}))


def limit(kind: str = REQUESTS, n: int = 3, scope: str = "key") -> Limit:
    return Limit(scope, kind, "test", f"rl-test:{uuid.uuid4().hex}", n)


def member() -> str:
    return uuid.uuid4().hex


async def test_it_admits_up_to_the_limit_then_slides(window):
    rpm = limit(n=3)
    seen = [await window.hit([rpm], member=member(), now_ms=t) for t in (0, 10_000, 20_000)]

    assert [d.allowed for d in seen] == [True, True, True]
    assert [d.states[0].remaining for d in seen] == [2, 1, 0]
    assert seen[0].headers() == {"X-RateLimit-Limit": "3", "X-RateLimit-Remaining": "2", "X-RateLimit-Reset": "60"}
    assert seen[2].headers()["X-RateLimit-Reset"] == "40"  # the request at 0 leaves at 60 s

    refused = await window.hit([rpm], member=member(), now_ms=30_000)
    assert not refused.allowed
    assert refused.states[0].wait_ms == 30_000
    assert refused.headers()["Retry-After"] == "30"
    assert refused.headers()["X-RateLimit-Remaining"] == "0"

    # At 60 s only the request made at 0 has left: one slot, not a fresh window of three.
    assert (await window.hit([rpm], member=member(), now_ms=WINDOW_MS)).allowed
    again = await window.hit([rpm], member=member(), now_ms=65_000)
    assert not again.allowed
    assert again.states[0].wait_ms == 5_000  # the request at 10 s leaves at 70 s
    assert (await window.hit([rpm], member=member(), now_ms=70_000)).allowed


async def test_it_does_not_count_refused_requests(window):
    rpm = limit(n=2)
    assert (await window.hit([rpm], member=member(), now_ms=0)).allowed
    assert (await window.hit([rpm], member=member(), now_ms=1_000)).allowed
    for t in range(2_000, 50_000, 4_000):
        assert not (await window.hit([rpm], member=member(), now_ms=t)).allowed

    admitted = await window.hit([rpm], member=member(), now_ms=60_001)

    assert admitted.allowed and admitted.states[0].used == 2  # the one at 1 s and this one


async def test_it_sums_tokens_over_the_window(window):
    tpm = limit(TOKENS, n=100)
    assert (await window.hit([tpm], member=member(), now_ms=0)).allowed
    await window.add_tokens(tpm, member=member(), tokens=60, now_ms=1_000)
    ok = await window.hit([tpm], member=member(), now_ms=2_000)
    assert ok.allowed and ok.states[0].used == 60
    assert ok.headers()["X-RateLimit-Remaining-Tokens"] == "40"
    await window.add_tokens(tpm, member=member(), tokens=50, now_ms=3_000)

    refused = await window.hit([tpm], member=member(), now_ms=4_000)

    assert not refused.allowed
    assert refused.states[0].used == 110
    assert refused.states[0].wait_ms == 57_000  # once the 60 tokens of 1 s have left, 50 < 100
    assert (await window.hit([tpm], member=member(), now_ms=61_001)).allowed


async def test_it_checks_every_limit_at_once_and_counts_nothing_when_one_refuses(window):
    key_rpm, agent_rpm = limit(n=5), limit(n=2, scope="agent")
    for t in (0, 1):
        assert (await window.hit([key_rpm, agent_rpm], member=member(), now_ms=t)).allowed

    refused = await window.hit([key_rpm, agent_rpm], member=member(), now_ms=2)

    assert not refused.allowed
    assert refused.refusing().limit is agent_rpm
    # The refused request was not counted against the key: 3 more fit its limit of 5.
    assert [(await window.hit([key_rpm], member=member(), now_ms=3)).allowed for _ in range(4)] == [
        True, True, True, False]


async def test_it_releases_a_counted_request(window):
    rpm = limit(n=1)
    first = member()
    assert (await window.hit([rpm], member=first, now_ms=0)).allowed
    assert not (await window.hit([rpm], member=member(), now_ms=1)).allowed

    await window.release([rpm], member=first)

    assert (await window.hit([rpm], member=member(), now_ms=2)).allowed


# --- over HTTP ----------------------------------------------------------------------------


@pytest.fixture
def agents(make_agent):
    return {"demo": make_agent(name="demo"), "busy": make_agent(name="busy", rate_limit_rpm=2)}


def _limit_key(secret: str, **limits) -> None:
    ApiKey.objects.filter(prefix=split_key(secret)).update(**limits)


async def test_it_answers_429_with_headers_over_the_request_limit(agents, make_key):
    key = await orm(make_key)
    await orm(_limit_key, key, rate_limit_rpm=3)
    api = Api(key)

    answers = [await api.post(CHAT.format("demo"), {"message": f"hi {i}"}) for i in range(3)]
    refused = await api.post(CHAT.format("demo"), {"message": "one too many"})

    assert [r.status_code for r in answers] == [200, 200, 200]
    assert [r.headers["X-RateLimit-Remaining"] for r in answers] == ["2", "1", "0"]
    assert all(r.headers["X-RateLimit-Limit"] == "3" for r in answers)
    assert 59 <= int(answers[0].headers["X-RateLimit-Reset"]) <= 60
    error = assert_error(refused, 429, "rate_limited")
    assert error["type"] == "rate_limit_error"
    assert error["details"]["scope"] == "key" and error["details"]["limit"] == "requests"
    assert 1 <= int(refused.headers["Retry-After"]) <= 60
    assert refused.headers["X-RateLimit-Limit"] == "3"
    assert refused.headers["X-RateLimit-Remaining"] == "0"
    assert refused.headers["X-RateLimit-Reset"] == refused.headers["Retry-After"]
    # A refused request leaves no run behind.
    assert await orm(Run.objects.count) == 3


class RefuseEverything:
    """A pipeline stage after the rate limit that refuses every turn (budget, guard...)."""

    async def before(self, turn):
        raise PermissionDenied("Refused by a later stage.", code="test_refusal")


async def test_it_does_not_count_a_turn_a_later_stage_refused(agents, make_key, settings):
    key = await orm(make_key)
    await orm(_limit_key, key, rate_limit_rpm=1)
    stages = list(settings.AGENT_PIPELINE_STAGES)
    settings.AGENT_PIPELINE_STAGES = [*stages, "test_ratelimit.RefuseEverything"]

    refused = await Api(key).post(CHAT.format("demo"), {"message": "no"})
    settings.AGENT_PIPELINE_STAGES = stages
    admitted = await Api(key).post(CHAT.format("demo"), {"message": "yes"})

    assert_error(refused, 403, "test_refusal")
    assert admitted.status_code == 200 and admitted.headers["X-RateLimit-Remaining"] == "0"


async def test_it_limits_the_openai_endpoint_and_streams_alike(agents, make_key):
    key = await orm(make_key)
    await orm(_limit_key, key, rate_limit_rpm=1)
    api = Api(key)

    streamed = await api.post(CHAT.format("demo"), {"message": "hi", "stream": True})
    refused = await api.post("/v1/chat/completions", {"model": "demo", "messages": [{"role": "user", "content": "x"}]})

    assert streamed.status_code == 200
    assert streamed.headers["X-RateLimit-Remaining"] == "0"
    assert_error(refused, 429, "rate_limited")


async def test_it_limits_tokens_per_minute(agents, make_key):
    key = await orm(make_key)
    await orm(_limit_key, key, rate_limit_tpm=10)
    api = Api(key)

    first = await api.post(CHAT.format("demo"), {"message": "tell me a few things about limits"})
    assert first.status_code == 200
    assert first.headers["X-RateLimit-Limit-Tokens"] == "10"
    assert first.headers["X-RateLimit-Remaining-Tokens"] == "10"  # counted once the run is done
    assert first.json()["usage"]["total_tokens"] >= 10

    refused = await api.post(CHAT.format("demo"), {"message": "and more"})

    error = assert_error(refused, 429, "rate_limited")
    assert error["details"]["limit"] == "tokens"
    assert error["details"]["used"] == first.json()["usage"]["total_tokens"]
    assert refused.headers["X-RateLimit-Remaining-Tokens"] == "0"


async def test_it_limits_an_agent_across_keys(agents, make_key):
    one, two = await orm(make_key), await orm(make_key)

    assert (await Api(one).post(CHAT.format("busy"), {"message": "a"})).status_code == 200
    second = await Api(two).post(CHAT.format("busy"), {"message": "b"})
    refused = await Api(two).post(CHAT.format("busy"), {"message": "c"})
    other_agent = await Api(two).post(CHAT.format("demo"), {"message": "d"})

    assert second.status_code == 200 and second.headers["X-RateLimit-Remaining"] == "0"
    error = assert_error(refused, 429, "rate_limited")
    assert error["details"]["scope"] == "agent"
    assert "busy" in error["message"]
    assert other_agent.status_code == 200


async def test_it_sends_no_rate_limit_headers_without_limits(agents, make_key):
    key = await orm(make_key)

    response = await Api(key).post(CHAT.format("demo"), {"message": "free"})

    assert response.status_code == 200
    assert not [h for h in response.headers if h.lower().startswith("x-ratelimit")]


# --- several worker processes against Redis ------------------------------------------------

SETUP = """
import json, sys
import django
django.setup()
from django.core.management import call_command
call_command("migrate", verbosity=0)
from agents.models import Agent
from governance.models import ApiKey
from governance.services import api_key_create, split_key
spec = json.loads(sys.argv[1])
for a in spec["agents"]:
    Agent.objects.create(**a)
keys = []
for i, limits in enumerate(spec["keys"]):
    _, secret = api_key_create(name=f"mp-{i}", role="client")
    ApiKey.objects.filter(prefix=split_key(secret)).update(**limits)
    keys.append(secret)
print(json.dumps(keys))
"""


class Workers:
    """Two Daphne processes sharing one database and one Redis."""

    def __init__(self, urls: list[str], keys: list[str], logs: list[Path]) -> None:
        self.urls, self.keys, self.logs = urls, keys, logs

    def log_tail(self) -> str:
        return "\n".join(p.read_text(errors="replace")[-2000:] for p in self.logs)


def _worker_database_url() -> str | None:
    """The test database (pytest-django's), as a DATABASE_URL for the workers; None for SQLite,
    whose test database is in memory: the workers then share a SQLite file of their own."""
    url = os.environ.get("DATABASE_URL", "")
    if not url or connection.vendor != "postgresql":
        return None
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path="/" + connection.settings_dict["NAME"]))


@pytest.fixture
def start_workers(tmp_path, fake_upstream, transactional_db):
    """start_workers(agents=[{...}], keys=[{rate_limit_rpm: ...}], settings={NAME: value}?) → Workers
    (settings: more environment variables for the workers); stopped afterwards."""
    if not django_settings.REDIS_URL:
        pytest.skip("multi-process tests need Redis shared by the workers: set REDIS_URL "
                    "(and DATABASE_URL=postgres://... to share the test database)")
    processes: list[subprocess.Popen] = []
    env = {k: v for k, v in os.environ.items()
           if k not in ("DATABASE_URL", "REDIS_URL", "CACHE_URL", "CELERY_BROKER_URL", "CELERY_TASK_ALWAYS_EAGER",
                        "TEST_DATABASE_NAME", "METRICS_TOKEN", "ALLOW_INSECURE_SECRET_KEY", "READ_DOT_ENV")}
    env.update(DJANGO_SETTINGS_MODULE="agentplatform.settings", DEBUG="0", SECRET_KEY=secrets.token_urlsafe(50),
               VAR_DIR=str(tmp_path), OPENAI_API_KEY="sk-test", OPENAI_BASE_URL=fake_upstream.base_url,
               LOG_LEVEL="WARNING", REDIS_URL=django_settings.REDIS_URL)
    database_url = _worker_database_url()
    if database_url:
        env["DATABASE_URL"] = database_url

    def start(*, agents: list[dict], keys: list[dict], settings: dict[str, str] | None = None) -> Workers:
        env.update(settings or {})
        setup = subprocess.run([sys.executable, "-c", SETUP, json.dumps({"agents": agents, "keys": keys})],
                               cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
        assert setup.returncode == 0, setup.stderr
        secrets_ = json.loads(setup.stdout.strip().splitlines()[-1])
        urls, logs = [], []
        for n in range(2):
            log_path = tmp_path / f"daphne-{n}.log"
            process, url = spawn_daphne(env, log_path)
            processes.append(process)
            urls.append(url)
            logs.append(log_path)
        deadline = time.monotonic() + 30
        for process, url, log_path in zip(processes, urls, logs):
            wait_ready(process, url, log_path, deadline)
        return Workers(urls, secrets_, logs)

    yield start
    stop_processes(processes)


async def burst(workers: Workers, key: str, n: int, *, body: dict, path: str = "/v1/chat/completions",
                headers: dict | None = None) -> list[httpx.Response]:
    """n concurrent requests, alternating between the workers."""
    limits = httpx.Limits(max_connections=n, max_keepalive_connections=n)
    async with httpx.AsyncClient(timeout=60, limits=limits) as client:
        return await asyncio.gather(*(
            client.post(f"{workers.urls[i % len(workers.urls)]}{path}", json=body,
                        headers={"Authorization": f"Bearer {key}", **(headers or {})})
            for i in range(n)))


@pytest.mark.redis
@pytest.mark.slow
async def test_it_admits_exactly_the_limit_across_two_workers(start_workers, fake_upstream):
    rounds = 3
    workers = start_workers(agents=[{"name": "echo", "model": "openai/gpt-4o-mini"}],
                            keys=[{"rate_limit_rpm": 20} for _ in range(rounds)])
    body = {"model": "echo", "messages": [{"role": "user", "content": "hello"}]}

    admitted = []
    for key in workers.keys:
        responses = await burst(workers, key, 60, body=body)
        statuses = sorted(r.status_code for r in responses)
        assert set(statuses) <= {200, 429}, workers.log_tail()
        admitted.append(statuses.count(200))
        # Both workers admitted some and refused some.
        for url in workers.urls:
            mine = [r for r in responses if str(r.request.url).startswith(url)]
            assert mine, url
        assert all(r.headers.get("Retry-After") for r in responses if r.status_code == 429)

    print(f"\nrate-limit precision, 2 workers, 60 concurrent requests at rpm=20: admitted {admitted}")
    assert admitted == [20] * rounds

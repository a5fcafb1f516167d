"""Shared fixtures: the fake OpenAI upstream, agents and API keys made through the ORM and our
services, an async HTTP client, SSE parsing, and the housekeeping the chat path needs
(its database threads, the shared cache)."""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import subprocess
import sys
import time
from datetime import datetime
from datetime import timezone as dt_timezone
from pathlib import Path
from typing import Any, Callable

import httpx
import pytest
import time_machine
from asgiref.sync import sync_to_async
from django.core.cache import cache
from django.db import connections

from agentplatform.testing.fake_openai import FakeOpenAIServer


# --- the clock ----------------------------------------------------------------------------

FAKE_NOW = Path(__file__).resolve().parent / "fake_now" / "sitecustomize.py"


def _fake_now_module():
    spec = importlib.util.spec_from_file_location("fake_now", FAKE_NOW)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def pytest_configure(config):
    """TEST_FAKE_NOW=2027-03-01T00:00:30Z runs the whole session from that instant on, the clock
    ticking (tests/fake_now/sitecustomize.py: also every thread and every process the tests
    spawn). Before collection, so that nothing reads the real clock first."""
    try:
        _fake_now_module().start()
    except ValueError as error:
        raise pytest.UsageError(str(error)) from None
    # No background work in the test process or the servers it starts (the beat schedule, the
    # start-up sweep of interrupted runs): tests that need it turn it on for their server.
    from django.conf import settings

    for name in ("INPROCESS_BEAT", "RUN_SWEEP_ON_START"):
        os.environ.setdefault(name, "0")
        setattr(settings, name, os.environ[name] not in ("0", "false", "False", ""))


def pytest_report_header(config):
    if os.environ.get("TEST_FAKE_NOW"):
        return f"TEST_FAKE_NOW: the session runs from {os.environ['TEST_FAKE_NOW']} on (clock ticking)"
    return None


@pytest.fixture
def frozen_clock():
    """The clock stopped for the whole test at the instant it starts (today's, or TEST_FAKE_NOW's):
    the data a test makes "today" or "this month" and the code's today are then the same, even
    for a test that starts at 23:59:59.9 on the last day of a month. For tests whose figures
    depend on the day, week or month they run in. The code under test must not wait for the wall
    clock (waits measure time.monotonic(), which keeps running); a test that needs the clock
    to move uses time_machine.travel(..., tick=True) or the traveller's shift()."""
    with time_machine.travel(datetime.now(dt_timezone.utc), tick=False) as traveller:
        yield traveller


# --- housekeeping -------------------------------------------------------------------------


@pytest.fixture(scope="session")
def django_db_setup(django_db_setup):
    """pytest-django's test database, plus: the chat path keeps database threads
    (agentplatform.db) with their own connections; close them before the database is
    dropped, or PostgreSQL refuses to drop it."""
    yield
    from agentplatform.db import close_db_threads

    close_db_threads()


@pytest.fixture(autouse=True)
def _fresh_cache():
    """Agents and API keys are cached (also misses): every test starts from an empty cache."""
    cache.clear()
    yield
    cache.clear()


# --- the fake upstream --------------------------------------------------------------------


@pytest.fixture
def eager_celery():
    """Run tasks in-process, as the embedded default does, on the Redis lane too."""
    from agentplatform.celery import app as celery_app

    before = celery_app.conf.task_always_eager
    celery_app.conf.task_always_eager = True
    yield
    celery_app.conf.task_always_eager = before


@pytest.fixture(scope="session")
def fake_upstream():
    with FakeOpenAIServer() as server:
        yield server


@pytest.fixture
async def openai_settings(settings, fake_upstream):
    """Point the `openai` provider at the fake upstream (the provider registry rebuilds itself
    on setting_changed). Async so that the provider's HTTP client, bound to this test's event
    loop, is closed in it."""
    settings.OPENAI_API_KEY = "sk-test"
    settings.OPENAI_BASE_URL = fake_upstream.base_url
    fake_upstream.reset()
    yield settings
    from agents.providers import provider_for

    provider, _ = provider_for("openai/any")
    await provider.aclose()


# --- factories ----------------------------------------------------------------------------


@pytest.fixture
def make_agent(db) -> Callable[..., Any]:
    """make_agent(name=..., model="local/demo", skills=[...], **fields): an Agent with its
    skills (built-ins get their code's description and parameters)."""
    from agents.models import Agent, AgentSkill, Skill
    from agents.skills import builtin_skill_defaults

    def make(name: str = "helper", model: str = "local/demo", skills: list[str] | None = None, **fields) -> Agent:
        agent = Agent.objects.create(name=name, model=model, **fields)
        for position, skill_name in enumerate(skills or []):
            skill = Skill.objects.filter(name=skill_name).first()
            if skill is None:
                skill = Skill.objects.create(name=skill_name, kind=Skill.Kind.BUILTIN,
                                             **builtin_skill_defaults(skill_name))
            AgentSkill.objects.create(agent=agent, skill=skill, position=position)
        return agent

    return make


@pytest.fixture
def make_key(db) -> Callable[..., str]:
    """make_key(role="client", agents=None, **kwargs): the secret of a new API key."""
    from governance.services import api_key_create

    counter = iter(range(1, 10_000))

    def make(role: str = "client", agents: list[str] | None = None, **kwargs) -> str:
        _, secret = api_key_create(name=f"{role}-{next(counter)}", role=role, agent_names=agents, **kwargs)
        return secret

    return make


def _call_and_close(fn: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
    try:
        return fn(*args, **kwargs)
    finally:
        # This runs in asgiref's shared sync thread, which outlives the test: leave no
        # connection checked out of PostgreSQL's pool there, or the test database cannot be
        # dropped at the end of the session.
        connections.close_all()


async def orm(fn: Callable[..., Any], *args, **kwargs) -> Any:
    """Run sync ORM code (a factory, a query: evaluate querysets inside) from an async test."""
    return await sync_to_async(_call_and_close)(fn, args, kwargs)


# --- HTTP helpers -------------------------------------------------------------------------
#
# Requests go through the project's real ASGI application (agentplatform.asgi: the body-size
# wrapper, the platform's ASGI handler, every middleware) with httpx's ASGI transport, in the
# test's event loop. httpx collects a streamed body whole, in order, so SSE tests see every
# event and heartbeat as sent.


class Api:
    """An httpx client on the ASGI app: JSON bodies, the key in `Authorization: Bearer`."""

    def __init__(self, key: str | None = None) -> None:
        from agentplatform.asgi import application

        self.key = key
        self.client = httpx.AsyncClient(transport=httpx.ASGITransport(app=application),
                                        base_url="http://testserver", timeout=30)

    def _headers(self, key: str | None, headers: dict | None) -> dict:
        out = dict(headers or {})
        key = self.key if key is None else key
        if key:
            out.setdefault("Authorization", f"Bearer {key}")
        return out

    async def get(self, path: str, *, key: str | None = None, headers: dict | None = None,
                  params: dict | None = None) -> httpx.Response:
        return await self.client.get(path, params=params, headers=self._headers(key, headers))

    async def post(self, path: str, body: Any = None, *, key: str | None = None, headers: dict | None = None,
                   raw: bytes | str | None = None, content_type: str = "application/json") -> httpx.Response:
        content = raw if raw is not None else json.dumps(body if body is not None else {})
        headers = {"Content-Type": content_type, **self._headers(key, headers)}
        return await self.client.post(path, content=content, headers=headers)

    async def delete(self, path: str, *, key: str | None = None) -> httpx.Response:
        return await self.client.delete(path, headers=self._headers(key, None))

    async def request(self, method: str, path: str, *, key: str | None = None, **kwargs) -> httpx.Response:
        return await self.client.request(method, path, headers=self._headers(key, kwargs.pop("headers", None)),
                                         **kwargs)


def parse_sse(text: str) -> list[dict]:
    """Blocks of an SSE body in order: {"event", "data"} (data decoded from JSON unless it is
    [DONE]), or {"comment"} for comment lines such as heartbeats."""
    events = []
    for block in text.split("\n\n"):
        if not block.strip():
            continue
        if block.startswith(":"):
            events.append({"comment": block[1:].strip()})
            continue
        event, data = None, []
        for line in block.split("\n"):
            if line.startswith("event: "):
                event = line[len("event: "):]
            elif line.startswith("data: "):
                data.append(line[len("data: "):])
        payload = "\n".join(data)
        events.append({"event": event, "data": payload if payload in ("", "[DONE]") else json.loads(payload)})
    return events


def error_body(response, status: int, code: str | None = None, *, param: str | None = None) -> dict:
    """The response (httpx's or Django's test client's) is an error in our one JSON shape;
    returns the error."""
    assert response.status_code == status, (response.status_code, response.content[:500])
    assert response.headers["content-type"].startswith("application/json")
    error = response.json()["error"]
    assert {"type", "code", "message", "request_id"} <= set(error), error
    assert error["message"]
    if code is not None:
        assert error["code"] == code, error
    if param is not None:
        assert error.get("param") == param, error
    return error


def assert_error(response: httpx.Response, status: int, code: str | None = None, *,
                 param: str | None = None) -> dict:
    """The response is an error in our one JSON shape and names its request id; returns the error."""
    error = error_body(response, status, code, param=param)
    assert response.headers.get("X-Request-ID"), "every error names its request"
    assert error["request_id"] == response.headers["X-Request-ID"]
    return error



def csp_directives(header: str) -> dict[str, list[str]]:
    """A Content-Security-Policy header as directive -> sources."""
    directives = {}
    for part in header.split(";"):
        name, *sources = part.split()
        assert name not in directives, f"{name} appears twice in {header!r}"
        directives[name] = sources
    return directives


# Every page of ours allows its own files only: no inline script or style, no eval, no frames.
PAGE_CSP = {
    "default-src": ["'self'"], "script-src": ["'self'"], "style-src": ["'self'"], "img-src": ["'self'", "data:"],
    "connect-src": ["'self'"], "object-src": ["'none'"], "base-uri": ["'self'"], "form-action": ["'self'"],
    "frame-ancestors": ["'none'"],
}


# --- a client that hangs up mid-stream -----------------------------------------------------


async def post_and_hang_up(path: str, body: dict, key: str, *, leave_when: Callable[[bytes], bool],
                           headers: dict[str, str] | None = None, leave_after: float | None = None) -> bytes:
    """POST to the real ASGI app and disconnect once `leave_when(bytes received so far)` holds
    (or `leave_after` seconds passed, whatever was received), as a browser closing its tab does
    (httpx's ASGI transport always reads a body whole). Returns what was received."""
    import asyncio

    from agentplatform.asgi import application

    raw = json.dumps(body).encode()
    extra = [(name.lower().encode(), value.encode()) for name, value in (headers or {}).items()]
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
             "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "",
             "client": ("127.0.0.1", 50000), "server": ("testserver", 80),
             "headers": [(b"host", b"testserver"), (b"content-type", b"application/json"),
                         (b"authorization", f"Bearer {key}".encode()), *extra,
                         (b"content-length", str(len(raw)).encode())]}
    received: list[bytes] = []
    leave = asyncio.Event()
    request_sent = False
    if leave_after is not None:
        asyncio.get_running_loop().call_later(leave_after, leave.set)

    async def receive() -> dict:
        nonlocal request_sent
        if not request_sent:
            request_sent = True
            return {"type": "http.request", "body": raw, "more_body": False}
        await leave.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        if message["type"] == "http.response.body":
            received.append(message.get("body", b""))
            if leave_when(b"".join(received)):
                leave.set()

    await asyncio.wait_for(application(scope, receive, send), timeout=10)
    return b"".join(received)


# --- real server processes (end-to-end and multi-worker tests) ------------------------------

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn_daphne(env: dict, log_path: Path) -> tuple[subprocess.Popen, str]:
    """Start one daphne server process with `env` (not waiting for it); returns it and its URL."""
    port = free_port()
    with open(log_path, "wb") as log:
        process = subprocess.Popen([sys.executable, "-m", "daphne", "-b", "127.0.0.1", "-p", str(port),
                                    "agentplatform.asgi:application"],
                                   cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    return process, f"http://127.0.0.1:{port}"


def wait_ready(process: subprocess.Popen, url: str, log_path: Path, deadline: float) -> None:
    """Poll /health until it answers 200; fail with the server's log if it exits or the deadline passes."""
    while True:
        assert process.poll() is None, f"daphne exited: {log_path.read_text()[-3000:]}"
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        assert time.monotonic() < deadline, f"daphne did not start: {log_path.read_text()[-3000:]}"
        time.sleep(0.1)


def stop_processes(processes: list[subprocess.Popen]) -> None:
    for process in processes:
        process.terminate()
    for process in processes:
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)


# --- a real browser -------------------------------------------------------------------------

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]


def _ensure_chromium() -> str | None:
    """Debian's Chromium at /usr/bin/chromium, installed with apt-get when missing (as root).
    Returns why it cannot be had, or None when it is there."""
    if CHROMIUM.exists():
        return None
    import shutil

    if shutil.which("apt-get") is None:
        return "Debian's chromium is not installed and there is no apt-get to install it"
    if os.geteuid() != 0:
        return "Debian's chromium is not installed (apt-get install chromium needs root)"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "-q", "--no-install-recommends", "chromium"]
    for step in (install, ["apt-get", "update", "-q"], install):
        done = subprocess.run(step, env=env, capture_output=True, text=True, timeout=900)
        if step is install and done.returncode == 0 and CHROMIUM.exists():
            return None
    return f"apt-get install chromium failed: {(done.stderr or done.stdout)[-500:]}"


@pytest.fixture(scope="module")
def chromium():
    """A headless Debian Chromium driven by Playwright (installed with apt-get when missing;
    the test is skipped, saying why, when that cannot be done). Module-scoped: Playwright's sync
    API keeps an event loop running in this thread while it is open, which async tests of other
    modules cannot share."""
    why = _ensure_chromium()
    if why:
        pytest.skip(why)
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("the playwright package is not installed (pip install -e '.[dev]')")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()


def watch_csp_violations(page, problems: list[str]) -> None:
    """Every Content-Security-Policy violation on any page of `page` becomes a problem (the
    browser also logs them as console errors; the event says which directive refused what)."""
    page.expose_function("__reportCspViolation", lambda v: problems.append(f"CSP violation: {v}"))
    page.add_init_script("""document.addEventListener("securitypolicyviolation", e => window.__reportCspViolation(
        `${e.effectiveDirective} refused ${e.blockedURI || "inline"} at ${e.sourceFile}:${e.lineNumber}`));""")


def artifact_path(name: str) -> Path:
    """Where a test keeps a file for people to look at (screenshots): TEST_ARTIFACTS_DIR, set by
    scripts/test.sh, else test-artifacts/ in the repository."""
    folder = Path(os.environ.get("TEST_ARTIFACTS_DIR") or ROOT / "test-artifacts")
    folder.mkdir(parents=True, exist_ok=True)
    return folder / name

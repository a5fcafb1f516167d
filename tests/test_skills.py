"""Built-in skills and skill_execute, against a real local HTTP server and a real database."""

from __future__ import annotations

import json
import logging
import threading
import time
from datetime import datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from asgiref.sync import sync_to_async
from django.db import connection, connections

from agents.models import Agent, Document
from agents.skills import BUILTINS, builtin_skill_defaults, skill_execute
from agents.skills.base import SkillContext, SkillSpec, ToolResult
from agents.skills.http_fetch import host_allowed

CONTEXT = SkillContext(agent_id=1, agent_name="tester", request_id="req-123")
ON_POSTGRESQL = connection.vendor == "postgresql"


def builtin(name: str, **config) -> SkillSpec:
    return SkillSpec(name=name, description="", kind="builtin", config=config)


async def call(name: str, arguments, *, context: SkillContext = CONTEXT, **config) -> ToolResult:
    return await skill_execute(skill=builtin(name, **config), arguments=arguments, context=context)


# --- a real HTTP server ------------------------------------------------------------------

class _Handler(BaseHTTPRequestHandler):
    def log_message(self, format, *args):  # keep test output clean
        pass

    def _record(self, body: bytes = b"") -> None:
        self.server.requests.append({"method": self.command, "path": self.path,
                                     "headers": dict(self.headers), "body": body})

    def _send(self, status: int, body: bytes, content_type: str = "text/plain; charset=utf-8", **headers) -> None:
        try:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            for name, value in headers.items():
                self.send_header(name.replace("_", "-"), value)
            self.end_headers()
            self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up first: what the timeout tests want

    def do_GET(self):
        self._record()
        if self.path == "/hello":
            self._send(200, "héllo world".encode())
        elif self.path == "/big":
            self._send(200, b"x" * 5000)
        elif self.path == "/slow":
            time.sleep(1.0)
            self._send(200, b"too late")
        elif self.path == "/redirect":
            self._send(302, b"", Location="http://elsewhere.invalid/secret")
        else:
            self._send(404, b"not here")

    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self._record(body)
        if self.path == "/echo":
            self._send(200, json.dumps({"received": json.loads(body)}).encode(), "application/json")
        elif self.path == "/fail":
            self._send(503, b"weather service down")
        elif self.path == "/big":
            self._send(200, b"y" * 150_000)
        elif self.path == "/slow":
            time.sleep(1.0)
            self._send(200, b"too late")
        else:
            self._send(404, b"not here")


@pytest.fixture
def server():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    httpd.daemon_threads = True
    httpd.block_on_close = False  # the /slow handler may still sleep at teardown
    httpd.requests = []
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    httpd.base_url = f"http://127.0.0.1:{httpd.server_address[1]}"
    yield httpd
    httpd.shutdown()
    httpd.server_close()


# --- calculator ----------------------------------------------------------------------------

@pytest.mark.parametrize("expression, expected", [
    ("2 + 3 * 4", "14"),
    ("(2 + 3) * 4", "20"),
    ("2 ** 3 ** 2", "512"),
    ("-2 ** 2", "-4"),
    ("10 / 4", "2.5"),
    ("10 / 2", "5"),
    ("7 // 2", "3"),
    ("-7 % 3", "2"),
    ("0.1 + 0.2", "0.3"),
    ("2 ^ 10", "1024"),
    ("2 ** 100", "1267650600228229401496703205376"),
])
async def test_it_calculates_with_precedence(expression, expected):
    result = await call("calculator", {"expression": expression})

    assert result == ToolResult(content=expected)


@pytest.mark.parametrize("expression, expected", [
    ("sqrt(16) + abs(-3)", "7"),
    ("round(3.14159, 2)", "3.14"),
    ("min(4, 2, 8) + max(1, 9)", "11"),
    ("log(e)", "1"),
    ("log(1000, 10)", "3"),
    ("cos(0) + sin(0)", "1"),
    ("tan(pi / 4)", "1"),
    ("2 * pi", "6.28318530718"),
])
async def test_it_calculates_functions_and_constants(expression, expected):
    result = await call("calculator", json.dumps({"expression": expression}))

    assert result == ToolResult(content=expected)


@pytest.mark.parametrize("expression", ["1 / 0", "5 // 0", "5 % 0", "1 / (2 - 2)"])
async def test_it_refuses_division_by_zero(expression):
    result = await call("calculator", {"expression": expression})

    assert result == ToolResult(content="error: division by zero", is_error=True)


@pytest.mark.parametrize("expression", [
    "__import__('os').system('echo hacked')",
    "().__class__.__bases__[0].__subclasses__()",
    "open('/etc/passwd').read()",
    "x + 1",
    "sqrt.__doc__",
    "(lambda: 1)()",
    "'a' * 3",
    "[1, 2][0]",
    "1 if 1 else 2",
    "1 < 2",
    "True + 1",
    "1j * 1j",
    "sqrt(x=4)",
    "max(*[1, 2])",
])
async def test_it_refuses_anything_but_arithmetic(expression):
    result = await call("calculator", {"expression": expression})

    assert result.is_error
    assert result.content.startswith("error: ")


@pytest.mark.parametrize("expression", ["9 ** 9 ** 9", "10 ** 5000", "2 ** 2 ** 2 ** 2 ** 2",
                                        "(10 ** 3000) * (10 ** 3000)", "10.0 ** 400", "exp(1000)", "1e400"])
async def test_it_refuses_huge_results(expression):
    started = time.monotonic()

    result = await call("calculator", {"expression": expression})

    assert result.is_error
    assert "large" in result.content or "digits" in result.content
    assert time.monotonic() - started < 1


async def test_it_refuses_long_expressions():
    result = await call("calculator", {"expression": "1+" * 300 + "1"})

    assert result == ToolResult(content="error: expression is longer than 500 characters", is_error=True)


@pytest.mark.parametrize("expression", ["sqrt(-1)", "log(0)", "(-8) ** 0.5", "", "2 +", "(" * 201 + "1" + ")" * 201])
async def test_it_reports_invalid_math_as_errors(expression):
    result = await call("calculator", {"expression": expression})

    assert result.is_error


# --- current_time --------------------------------------------------------------------------

async def test_it_tells_the_time_in_utc_by_default():
    result = await call("current_time", None)

    stamp, rest = result.content.split(" ", 1)
    moment = datetime.fromisoformat(stamp)
    assert moment.utcoffset().total_seconds() == 0
    assert rest == f"({moment.strftime('%A')}, UTC)"
    assert abs(moment.timestamp() - time.time()) < 5


async def test_it_tells_the_time_in_a_zone():
    result = await call("current_time", {"timezone": "Asia/Kolkata"})

    stamp, rest = result.content.split(" ", 1)
    assert datetime.fromisoformat(stamp).utcoffset().total_seconds() == 5.5 * 3600
    assert rest.endswith(", Asia/Kolkata)")


@pytest.mark.parametrize("zone", ["Mars/Olympus_Mons", "../../etc/passwd", "/etc/localtime", 42])
async def test_it_refuses_unknown_zones(zone):
    result = await call("current_time", {"timezone": zone})

    assert result.is_error
    assert "time zone" in result.content


# --- http_fetch ----------------------------------------------------------------------------

async def test_it_fetches_from_an_allowed_host(server):
    result = await call("http_fetch", {"url": f"{server.base_url}/hello"}, allowed_hosts=["127.0.0.1"])

    assert result == ToolResult(content="HTTP 200\ntext/plain; charset=utf-8\n\nhéllo world")
    assert [(r["method"], r["path"]) for r in server.requests] == [("GET", "/hello")]


async def test_it_returns_error_statuses_as_content(server):
    result = await call("http_fetch", {"url": f"{server.base_url}/missing"}, allowed_hosts=["127.0.0.1"])

    assert not result.is_error
    assert result.content.startswith("HTTP 404\n")


@pytest.mark.parametrize("config", [{"allowed_hosts": ["example.com"]}, {"allowed_hosts": []}, {},
                                    {"allowed_hosts": ["*.0.0.1"]}])
async def test_it_refuses_hosts_not_allowed_without_a_request(server, config):
    result = await call("http_fetch", {"url": f"{server.base_url}/hello"}, **config)

    assert result.is_error
    assert "not in this skill's allowed hosts" in result.content
    assert server.requests == []


@pytest.mark.parametrize("url", ["file:///etc/passwd", "ftp://127.0.0.1/x", "javascript:alert(1)",
                                 "http://user:secret@127.0.0.1/hello", "http:///hello", "not a url", ""])
async def test_it_refuses_bad_urls_without_a_request(server, url):
    result = await call("http_fetch", {"url": url.replace("127.0.0.1", server.base_url[7:])},
                        allowed_hosts=["127.0.0.1"])

    assert result.is_error
    assert server.requests == []


async def test_it_only_makes_get_requests(server):
    result = await call("http_fetch", {"url": f"{server.base_url}/hello", "method": "POST"},
                        allowed_hosts=["127.0.0.1"])

    assert result == ToolResult(content="error: http_fetch only makes GET requests", is_error=True)
    assert server.requests == []


async def test_it_truncates_large_bodies(server):
    result = await call("http_fetch", {"url": f"{server.base_url}/big"}, allowed_hosts=["127.0.0.1"], max_bytes=1000)

    head, body = result.content.split("\n\n", 1)
    assert head == "HTTP 200\ntext/plain; charset=utf-8"
    assert body == "x" * 1000 + "\n[truncated after 1000 bytes]"


async def test_it_times_out_on_slow_hosts(server):
    started = time.monotonic()

    result = await call("http_fetch", {"url": f"{server.base_url}/slow"}, allowed_hosts=["127.0.0.1"],
                        timeout_seconds=0.2)

    assert result == ToolResult(content="error: request timed out after 0.2 s", is_error=True)
    assert time.monotonic() - started < 0.9


async def test_it_reports_redirects_without_following_them(server):
    result = await call("http_fetch", {"url": f"{server.base_url}/redirect"}, allowed_hosts=["127.0.0.1"])

    assert result.content.startswith("HTTP 302\n")
    assert "Location: http://elsewhere.invalid/secret" in result.content
    assert len(server.requests) == 1


def test_it_matches_hosts_exactly_or_by_subdomain_wildcard():
    allowed = ["docs.example.com", "*.example.org", "Bücher.de"]

    assert host_allowed("docs.example.com", allowed)
    assert host_allowed("DOCS.example.com.", allowed)
    assert not host_allowed("api.docs.example.com", allowed)
    assert not host_allowed("example.com", allowed)
    assert host_allowed("api.example.org", allowed)
    assert host_allowed("a.b.example.org", allowed)
    assert not host_allowed("example.org", allowed)
    assert not host_allowed("badexample.org", allowed)
    assert not host_allowed("example.org.evil.com", allowed)
    assert host_allowed("xn--bcher-kva.de", allowed)


# --- kind "http" skills ----------------------------------------------------------------------

def http_spec(url: str, **config) -> SkillSpec:
    return SkillSpec(name="weather", description="Weather", kind="http",
                     parameters={"type": "object", "properties": {"city": {"type": "string"}}},
                     config={"url": url, **config})


async def test_it_posts_arguments_as_json_to_http_skills(server):
    spec = http_spec(f"{server.base_url}/echo", headers={"X-Token": "tok-1"})

    result = await skill_execute(skill=spec, arguments='{"city": "Lyon"}', context=CONTEXT)

    assert result == ToolResult(content='{"received": {"city": "Lyon"}}')
    [request] = server.requests
    assert request["method"] == "POST"
    assert json.loads(request["body"]) == {"city": "Lyon"}
    assert request["headers"]["Content-Type"] == "application/json"
    assert request["headers"]["X-Token"] == "tok-1"
    assert request["headers"]["X-Request-Id"] == "req-123"


async def test_it_reports_non_2xx_answers_of_http_skills(server):
    result = await skill_execute(skill=http_spec(f"{server.base_url}/fail"), arguments={}, context=CONTEXT)

    assert result == ToolResult(content="error: the weather endpoint answered HTTP 503: weather service down",
                                is_error=True)


async def test_it_caps_http_skill_responses(server):
    result = await skill_execute(skill=http_spec(f"{server.base_url}/big"), arguments={}, context=CONTEXT)

    assert result.content == "y" * 100_000 + "\n[truncated after 100000 bytes]"


async def test_it_times_out_http_skills(server):
    result = await skill_execute(skill=http_spec(f"{server.base_url}/slow", timeout_seconds=0.2),
                                 arguments={}, context=CONTEXT)

    assert result == ToolResult(content="error: the weather endpoint did not answer within 0.2 s", is_error=True)


async def test_it_hides_the_endpoint_when_http_skills_are_unreachable(server):
    port = server.server_address[1]
    server.shutdown()
    server.server_close()

    result = await skill_execute(skill=http_spec(f"http://127.0.0.1:{port}/echo?token=s3cret"),
                                 arguments={}, context=CONTEXT)

    assert result == ToolResult(content="error: the weather endpoint could not be reached (ConnectError)",
                                is_error=True)


@pytest.mark.parametrize("config", [{"url": "file:///etc/passwd"}, {"url": ""}, {"url": "ftp://127.0.0.1/"},
                                    {"headers": {"X-Token": {"env": "TOKEN"}}}, {"timeout_seconds": "soon"}])
async def test_it_reports_misconfigured_http_skills(server, config):
    spec = http_spec(f"{server.base_url}/echo")
    spec = SkillSpec(name=spec.name, description="", kind="http", config={**spec.config, **config})

    result = await skill_execute(skill=spec, arguments={}, context=CONTEXT)

    assert result.is_error
    assert "misconfigured" in result.content
    assert server.requests == []


# --- knowledge_search --------------------------------------------------------------------------

@pytest.fixture(autouse=True)
async def _close_thread_connections():
    # The ORM runs in asgiref's shared sync thread here; its connection outlives the test
    # unless closed, and an open one keeps PostgreSQL from dropping the test database.
    yield
    await sync_to_async(connections.close_all, thread_sensitive=True)()


async def make_agent(name: str = "librarian") -> tuple[Agent, SkillContext]:
    agent = await Agent.objects.acreate(name=name, model="local/demo")
    return agent, SkillContext(agent_id=agent.id, agent_name=agent.name)


@pytest.mark.django_db(transaction=True)
async def test_it_searches_the_agents_documents():
    agent, context = await make_agent()
    other, _ = await make_agent("other")
    await Document.objects.acreate(agent=agent, title="Refund policy", source="kb/refunds.md",
                                   content="Customers may ask for a refund within 30 days of purchase.")
    await Document.objects.acreate(agent=agent, title="Shipping", content="Parcels ship within two days.")
    await Document.objects.acreate(agent=other, title="Refund secrets", content="Another agent's refund notes.")

    result = await call("knowledge_search", {"query": "refund"}, context=context)

    assert result == ToolResult(content="[1] Refund policy (kb/refunds.md)\n"
                                        "Customers may ask for a refund within 30 days of purchase.")


@pytest.mark.django_db(transaction=True)
async def test_it_says_when_nothing_matched():
    agent, context = await make_agent()
    await Document.objects.acreate(agent=agent, title="Shipping", content="Parcels ship within two days.")

    result = await call("knowledge_search", {"query": "warranty"}, context=context)

    assert result == ToolResult(content="No documents matched.")


@pytest.mark.django_db(transaction=True)
async def test_it_limits_results_and_ranks_the_best_first():
    agent, context = await make_agent()
    for number in range(6):
        await Document.objects.acreate(agent=agent, title=f"Note {number}", content="A note about invoices.")
    await Document.objects.acreate(agent=agent, title="Invoices",
                                   content="Invoices, invoices, invoices: how billing works.")

    result = await call("knowledge_search", {"query": "invoices", "limit": 2}, context=context)

    assert result.content.startswith("[1] Invoices\n")
    assert "[2] Note " in result.content
    assert "[3]" not in result.content


@pytest.mark.django_db(transaction=True)
async def test_it_snips_long_documents_around_the_first_hit():
    agent, context = await make_agent()
    content = "filler " * 300 + "the warranty lasts two years. " + "padding " * 300
    await Document.objects.acreate(agent=agent, title="Terms", content=content)

    result = await call("knowledge_search", {"query": "warranty"}, context=context)

    heading, snippet = result.content.split("\n", 1)
    assert heading == "[1] Terms"
    assert "the warranty lasts two years." in snippet
    assert snippet.startswith("...") and snippet.endswith("...")
    assert len(snippet) <= 500 + len("......")


@pytest.mark.parametrize("arguments", [{}, {"query": "  "}, {"query": "refund", "limit": "many"},
                                       {"query": "x" * 501}])
async def test_it_refuses_bad_search_arguments(arguments):
    result = await call("knowledge_search", arguments)

    assert result.is_error


@pytest.mark.skipif(ON_POSTGRESQL, reason="the word-matching fallback runs on databases other than PostgreSQL")
@pytest.mark.django_db(transaction=True)
async def test_it_weighs_title_hits_more_on_sqlite():
    agent, context = await make_agent()
    await Document.objects.acreate(agent=agent, title="Misc", content="tea and tea again")
    await Document.objects.acreate(agent=agent, title="Tea", content="brewing guide")
    await Document.objects.acreate(agent=agent, title="Coffee", content="short words like a or to are ignored")

    result = await call("knowledge_search", {"query": "tea to", "limit": 5}, context=context)

    assert [line for line in result.content.splitlines() if line.startswith("[")] == ["[1] Tea", "[2] Misc"]


@pytest.mark.postgres
@pytest.mark.skipif(not ON_POSTGRESQL, reason="needs DATABASE_URL pointing at PostgreSQL (full-text search)")
@pytest.mark.django_db(transaction=True)
async def test_it_uses_full_text_search_on_postgresql():
    agent, context = await make_agent()
    await Document.objects.acreate(agent=agent, title="Running shoes", content="How to choose shoes for a marathon.")
    await Document.objects.acreate(agent=agent, title="Diet", content="Runners should eat pasta before they run.")
    await Document.objects.acreate(agent=agent, title="Cycling", content="Bikes and running commentary.")

    stemmed = await call("knowledge_search", {"query": "runs", "limit": 5}, context=context)
    websearch = await call("knowledge_search", {"query": "running -bikes", "limit": 5}, context=context)
    phrase = await call("knowledge_search", {"query": '"eat pasta"'}, context=context)

    # "runs" matches "running" and "run" by stem; the title hit (weight A) ranks first.
    assert [line for line in stemmed.content.splitlines() if line.startswith("[")] == [
        "[1] Running shoes", "[2] Diet", "[3] Cycling"]
    assert "Cycling" not in websearch.content
    assert phrase.content.startswith("[1] Diet\n")


# --- the executor ------------------------------------------------------------------------------

@pytest.mark.parametrize("arguments", ["{not json", "[1, 2]", '"text"'])
async def test_it_reports_invalid_arguments(arguments):
    result = await call("calculator", arguments)

    assert result.is_error
    assert result.content.startswith("error: arguments ")


async def test_it_reports_unknown_builtins_and_kinds():
    unknown = await call("teleport", {})
    odd_kind = await skill_execute(skill=SkillSpec(name="x", description="", kind="grpc"),
                                   arguments={}, context=CONTEXT)

    assert unknown == ToolResult(content="error: unknown built-in skill 'teleport'", is_error=True)
    assert odd_kind == ToolResult(content="error: unsupported skill kind 'grpc'", is_error=True)


class _Broken:
    name = "broken"
    description = "Always fails."
    parameters = {"type": "object", "properties": {}}

    async def run(self, arguments, *, config, context):
        raise RuntimeError("boom")


async def test_it_turns_unexpected_failures_into_logged_error_results(monkeypatch, caplog):
    monkeypatch.setitem(BUILTINS, "broken", _Broken())

    with caplog.at_level(logging.ERROR, logger="agents.skills"):
        result = await call("broken", {"password": "hunter2"}, api_key="sk-secret")

    assert result == ToolResult(content="error: broken failed unexpectedly", is_error=True)
    [record] = caplog.records
    assert record.name == "agents.skills"
    assert record.exc_info[0] is RuntimeError
    assert "hunter2" not in record.getMessage() and "sk-secret" not in record.getMessage()


def test_it_describes_every_builtin_for_seeding():
    for name, skill in BUILTINS.items():
        defaults = builtin_skill_defaults(name)

        assert skill.name == name
        assert defaults["description"]
        assert defaults["parameters"]["type"] == "object"
        assert set(defaults["parameters"].get("required", [])) <= set(defaults["parameters"]["properties"])
    assert set(BUILTINS) == {"calculator", "current_time", "http_fetch", "knowledge_search"}
    with pytest.raises(KeyError):
        builtin_skill_defaults("teleport")


def test_it_hands_out_copies_of_builtin_parameters():
    builtin_skill_defaults("calculator")["parameters"]["properties"].clear()

    assert builtin_skill_defaults("calculator")["parameters"]["properties"]

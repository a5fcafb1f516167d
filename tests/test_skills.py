"""Built-in skills and skill_execute, against a real local HTTP server and a real database."""

from __future__ import annotations

import ipaddress
import json
import logging
import socket
import ssl
import threading
import time
from datetime import datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

import pytest
import trustme
from asgiref.sync import sync_to_async
from conftest import Api, orm
from django.db import connection, connections

from agents.models import Agent, AgentSkill, Document, Skill
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
        elif self.path.startswith("/bounce?"):
            self._send(302, b"", Location=parse_qs(urlsplit(self.path).query)["to"][0])
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


def serve(address: str, port: int = 0, tls: ssl.SSLContext | None = None):
    httpd = ThreadingHTTPServer((address, port), _Handler)
    if tls is not None:
        httpd.socket = tls.wrap_socket(httpd.socket, server_side=True)
    httpd.daemon_threads = True
    httpd.block_on_close = False  # the /slow handler may still sleep at teardown
    httpd.requests = []
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    httpd.port = httpd.server_address[1]
    httpd.entry = f"{address}:{httpd.port}"  # its allowed_hosts entry
    httpd.base_url = f"http://{httpd.entry}"
    return httpd


@pytest.fixture
def server():
    httpd = serve("127.0.0.1")
    yield httpd
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture
def tls_server(monkeypatch, tmp_path):
    """An HTTPS server whose certificate names "localhost" only, from a CA that SSL_CERT_FILE trusts."""
    ca = trustme.CA()
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    monkeypatch.setenv("SSL_CERT_FILE", str(tmp_path / "ca.pem"))
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("localhost").configure_cert(context)
    server_names = []
    context.sni_callback = lambda sock, name, ctx: server_names.append(name)
    httpd = serve("127.0.0.1", tls=context)
    httpd.server_names = server_names
    yield httpd
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture
def internal_server():
    """An "internal service" on another loopback address (Linux routes all of 127.0.0.0/8 to lo)."""
    httpd = serve("127.0.0.2")
    yield httpd
    httpd.shutdown()
    httpd.server_close()


def networks(*cidrs: str) -> tuple:
    return tuple(ipaddress.ip_network(cidr) for cidr in cidrs)


@pytest.fixture
def loopback_allowed(settings):
    """As a deployment whose skills call local services: HTTP_FETCH_ALLOW_PRIVATE_NETWORKS=127.0.0.0/8,::1."""
    settings.HTTP_FETCH_ALLOW_PRIVATE_NETWORKS = networks("127.0.0.0/8", "::1/128")


@pytest.fixture
def resolver(monkeypatch):
    """A test-local DNS: names in `resolver.answers` resolve to the next addresses of their list
    (the last entry repeats; an empty one is NXDOMAIN); every other name goes to the system
    resolver. `resolver.lookups` counts the lookups of each such name."""
    real = socket.getaddrinfo
    answers: dict[str, list[list[str]]] = {}
    lookups: dict[str, int] = {}

    def getaddrinfo(host, port, family=0, type=0, proto=0, flags=0):
        name = host.decode() if isinstance(host, bytes) else host
        if name not in answers:
            return real(host, port, family, type, proto, flags)
        turn = lookups.get(name, 0)
        lookups[name] = turn + 1
        addresses = answers[name][min(turn, len(answers[name]) - 1)]
        if not addresses:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return [(socket.AF_INET6 if ":" in a else socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP, "",
                 (a, int(port or 0)) if ":" not in a else (a, int(port or 0), 0, 0)) for a in addresses]

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    getaddrinfo.answers, getaddrinfo.lookups = answers, lookups
    return getaddrinfo


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

async def test_it_fetches_from_an_allowed_host(server, loopback_allowed):
    result = await call("http_fetch", {"url": f"{server.base_url}/hello"}, allowed_hosts=[server.entry])

    assert result == ToolResult(content="HTTP 200\ntext/plain; charset=utf-8\n\nhéllo world")
    assert [(r["method"], r["path"]) for r in server.requests] == [("GET", "/hello")]


async def test_it_fetches_a_name_at_the_address_it_resolved_with_the_name_as_host(server, loopback_allowed):
    result = await call("http_fetch", {"url": f"http://localhost:{server.port}/hello"},
                        allowed_hosts=[f"localhost:{server.port}"])

    assert result == ToolResult(content="HTTP 200\ntext/plain; charset=utf-8\n\nhéllo world")
    [request] = server.requests
    assert request["headers"]["Host"] == f"localhost:{server.port}"


async def test_it_verifies_tls_for_the_name_while_connecting_to_the_checked_address(tls_server, loopback_allowed):
    port = tls_server.port

    by_name = await call("http_fetch", {"url": f"https://localhost:{port}/hello"}, allowed_hosts=[f"localhost:{port}"])
    by_ip = await call("http_fetch", {"url": f"https://127.0.0.1:{port}/hello"}, allowed_hosts=[f"127.0.0.1:{port}"])

    assert by_name == ToolResult(content="HTTP 200\ntext/plain; charset=utf-8\n\nhéllo world")
    assert tls_server.server_names[0] == "localhost"  # SNI: the name, not the address
    assert tls_server.requests[0]["headers"]["Host"] == f"localhost:{port}"
    assert by_ip.is_error and "CERTIFICATE_VERIFY_FAILED" in by_ip.content  # the certificate names localhost only
    assert len(tls_server.requests) == 1


async def test_it_returns_error_statuses_as_content(server, loopback_allowed):
    result = await call("http_fetch", {"url": f"{server.base_url}/missing"}, allowed_hosts=[server.entry])

    assert not result.is_error
    assert result.content.startswith("HTTP 404\n")


@pytest.mark.parametrize("config", [{"allowed_hosts": ["example.com"]}, {"allowed_hosts": []}, {},
                                    {"allowed_hosts": ["*.0.0.1"]}])
async def test_it_refuses_hosts_not_allowed_without_a_request(server, loopback_allowed, config):
    result = await call("http_fetch", {"url": f"{server.base_url}/hello"}, **config)

    assert result.is_error
    assert "not in this skill's allowed hosts" in result.content
    assert server.requests == []


# Each host is on the allow-list (with and without the port): only where it points refuses it.
@pytest.mark.parametrize("host, kind", [
    ("localhost", "loopback"),
    ("127.0.0.1", "loopback"),
    ("2130706433", "loopback"),  # 127.0.0.1 as one decimal number, which the resolver accepts
    ("0x7f.1", "loopback"),
    ("127.1", "loopback"),
    ("[::ffff:127.0.0.1]", "loopback"),  # IPv4-mapped IPv6
    ("[2002:7f00:1::]", "loopback"),  # 6to4 carrying 127.0.0.1
    ("0.0.0.0", "unspecified"),  # reaches this host's listeners on Linux
    ("[::1]", "loopback"),
    ("[::]", "unspecified"),
    ("169.254.169.254", "link-local"),  # cloud metadata
    ("[fe80::1]", "link-local"),
    ("10.0.0.1", "private"),
    ("172.16.0.1", "private"),
    ("192.168.1.1", "private"),
    ("[fc00::1]", "private"),
    ("100.64.0.1", "non-public"),  # shared address space (carrier-grade NAT)
    ("224.0.0.1", "multicast"),
    ("[ff02::1]", "multicast"),
    ("240.0.0.1", "private"),
    ("[64:ff9b::7f00:1]", "reserved"),  # NAT64
])
async def test_it_refuses_names_and_addresses_that_are_not_public(server, host, kind):
    url = f"http://{host}:{server.port}/hello"

    result = await call("http_fetch", {"url": url}, allowed_hosts=[host, f"{host}:{server.port}"],
                        timeout_seconds=2)

    assert result.is_error
    assert f"is not a public address ({kind}); only public addresses can be fetched" in result.content
    assert server.requests == []


async def test_it_says_what_a_name_resolved_to(server):
    result = await call("http_fetch", {"url": f"http://localhost:{server.port}/hello"},
                        allowed_hosts=[f"localhost:{server.port}"])

    assert result == ToolResult(content="error: host 'localhost' resolves to 127.0.0.1, which is not a public "
                                        "address (loopback); only public addresses can be fetched", is_error=True)


async def test_it_refuses_a_name_when_any_of_its_addresses_is_not_public(server, resolver):
    resolver.answers["mixed.example"] = [["93.184.215.14", "127.0.0.1"]]

    result = await call("http_fetch", {"url": f"http://mixed.example:{server.port}/hello"},
                        allowed_hosts=[f"mixed.example:{server.port}"])

    assert result.is_error
    assert "'mixed.example' resolves to 127.0.0.1, which is not a public address (loopback)" in result.content
    assert server.requests == []


@pytest.fixture
def rebound_server(server):
    """An internal service on the allowed server's port at another loopback address."""
    httpd = serve("127.0.0.2", server.port)
    yield httpd
    httpd.shutdown()
    httpd.server_close()


async def test_it_connects_to_the_address_it_checked_and_sees_a_rebound_name(server, rebound_server, resolver,
                                                                             settings):
    # Only the allowed server's address is exempt; the name then rebinds to the internal one.
    settings.HTTP_FETCH_ALLOW_PRIVATE_NETWORKS = networks("127.0.0.1/32")
    resolver.answers["docs.example"] = [["127.0.0.1"], ["127.0.0.2"]]
    allowed = ["docs.example", f"docs.example:{server.port}"]

    first = await call("http_fetch", {"url": f"http://docs.example:{server.port}/hello"}, allowed_hosts=allowed)
    second = await call("http_fetch", {"url": f"http://docs.example:{server.port}/hello"}, allowed_hosts=allowed)

    assert first.content.startswith("HTTP 200\n")
    assert resolver.lookups["docs.example"] == 2  # one per fetch: the connection used the checked address
    assert server.requests[0]["headers"]["Host"] == f"docs.example:{server.port}"
    assert second.is_error
    assert "'docs.example' resolves to 127.0.0.2, which is not a public address (loopback)" in second.content
    assert rebound_server.requests == []


async def test_it_tries_the_next_checked_address_when_one_does_not_connect(server, resolver, loopback_allowed):
    resolver.answers["two.example"] = [["127.0.0.2", "127.0.0.1"]]  # nothing listens on the first

    result = await call("http_fetch", {"url": f"http://two.example:{server.port}/hello"},
                        allowed_hosts=[f"two.example:{server.port}"])

    assert result.content.startswith("HTTP 200\n")
    assert resolver.lookups["two.example"] == 1


async def test_it_reports_names_that_do_not_resolve(resolver):
    resolver.answers["gone.example"] = [[]]

    fetched = await call("http_fetch", {"url": "https://gone.example/"}, allowed_hosts=["gone.example"])
    posted = await skill_execute(skill=http_spec("https://gone.example/hook?token=s3cret"), arguments={},
                                 context=CONTEXT)

    assert fetched == ToolResult(content="error: host 'gone.example' could not be resolved", is_error=True)
    assert posted == ToolResult(content="error: the weather endpoint's host could not be resolved", is_error=True)


async def test_it_refuses_ports_the_allow_list_does_not_name(server, loopback_allowed):
    url = f"{server.base_url}/hello"

    bare = await call("http_fetch", {"url": url}, allowed_hosts=["127.0.0.1"])
    other_port = await call("http_fetch", {"url": url}, allowed_hosts=["127.0.0.1:8080", "*.example.com"])

    assert bare == ToolResult(content=f"error: port {server.port} is not allowed for host '127.0.0.1' "
                                      "(allowed ports: 80, 443)", is_error=True)
    assert other_port == ToolResult(content=f"error: port {server.port} is not allowed for host '127.0.0.1' "
                                            "(allowed ports: 8080)", is_error=True)
    assert server.requests == []


@pytest.mark.parametrize("entry", ["example.com:http", "example.com:0", "example.com:70000", "[::1]x"])
async def test_it_reports_allow_list_entries_with_bad_ports_as_misconfigured(server, entry):
    result = await call("http_fetch", {"url": "https://example.com/"}, allowed_hosts=[entry])

    assert result.is_error
    assert result.content.startswith("error: skill misconfigured: allowed_hosts entry ")


@pytest.mark.parametrize("url", ["file:///etc/passwd", "ftp://127.0.0.1/x", "javascript:alert(1)",
                                 "http://user:secret@127.0.0.1/hello", "http:///hello", "not a url", "",
                                 "http://0177.0.0.1/hello"])
async def test_it_refuses_bad_urls_without_a_request(server, loopback_allowed, url):
    result = await call("http_fetch", {"url": url.replace("127.0.0.1", server.entry)},
                        allowed_hosts=[server.entry])

    assert result.is_error
    assert server.requests == []


async def test_it_only_makes_get_requests(server, loopback_allowed):
    result = await call("http_fetch", {"url": f"{server.base_url}/hello", "method": "POST"},
                        allowed_hosts=[server.entry])

    assert result == ToolResult(content="error: http_fetch only makes GET requests", is_error=True)
    assert server.requests == []


async def test_it_truncates_large_bodies(server, loopback_allowed):
    result = await call("http_fetch", {"url": f"{server.base_url}/big"}, allowed_hosts=[server.entry], max_bytes=1000)

    head, body = result.content.split("\n\n", 1)
    assert head == "HTTP 200\ntext/plain; charset=utf-8"
    assert body == "x" * 1000 + "\n[truncated after 1000 bytes]"


async def test_it_times_out_on_slow_hosts(server, loopback_allowed):
    started = time.monotonic()

    result = await call("http_fetch", {"url": f"{server.base_url}/slow"}, allowed_hosts=[server.entry],
                        timeout_seconds=0.2)

    assert result == ToolResult(content="error: request timed out after 0.2 s", is_error=True)
    assert time.monotonic() - started < 0.9


async def test_it_reports_redirects_without_following_them(server, loopback_allowed):
    result = await call("http_fetch", {"url": f"{server.base_url}/redirect"}, allowed_hosts=[server.entry])

    assert result.content.startswith("HTTP 302\n")
    assert "Location: http://elsewhere.invalid/secret" in result.content
    assert len(server.requests) == 1


async def test_it_never_follows_a_redirect_into_a_private_address(server, internal_server, settings):
    settings.HTTP_FETCH_ALLOW_PRIVATE_NETWORKS = networks("127.0.0.1/32")  # the allowed server only
    target = f"{internal_server.base_url}/hello"
    allowed = [server.entry, internal_server.entry]

    bounced = await call("http_fetch", {"url": f"{server.base_url}/bounce?to={target}"}, allowed_hosts=allowed)
    followed = await call("http_fetch", {"url": target}, allowed_hosts=allowed)

    assert bounced.content.endswith(f"Redirect not followed. Location: {target}")
    assert followed == ToolResult(content="error: 127.0.0.2 is not a public address (loopback); "
                                          "only public addresses can be fetched", is_error=True)
    assert internal_server.requests == []


def test_it_matches_hosts_exactly_or_by_subdomain_wildcard():
    allowed = ["docs.example.com", "*.example.org", "Bücher.de"]

    assert host_allowed("docs.example.com", 443, allowed)
    assert host_allowed("DOCS.example.com.", 80, allowed)
    assert not host_allowed("api.docs.example.com", 443, allowed)
    assert not host_allowed("example.com", 443, allowed)
    assert host_allowed("api.example.org", 443, allowed)
    assert host_allowed("a.b.example.org", 443, allowed)
    assert not host_allowed("example.org", 443, allowed)
    assert not host_allowed("badexample.org", 443, allowed)
    assert not host_allowed("example.org.evil.com", 443, allowed)
    assert host_allowed("xn--bcher-kva.de", 443, allowed)


def test_it_opens_80_and_443_unless_an_entry_names_its_port():
    allowed = ["docs.example.com", "wiki.example.net:8080", "*.example.org:8443", "[::1]:9000", "2001:db8::1"]

    assert host_allowed("docs.example.com", 80, allowed) and host_allowed("docs.example.com", 443, allowed)
    assert not host_allowed("docs.example.com", 8080, allowed)
    assert host_allowed("wiki.example.net", 8080, allowed)
    assert not host_allowed("wiki.example.net", 443, allowed)
    assert host_allowed("api.example.org", 8443, allowed) and not host_allowed("api.example.org", 443, allowed)
    assert host_allowed("::1", 9000, allowed) and not host_allowed("::1", 80, allowed)
    assert host_allowed("2001:db8::1", 443, allowed) and not host_allowed("2001:db8::1", 8080, allowed)


@pytest.mark.django_db(transaction=True)
async def test_it_tells_the_model_when_an_allowed_name_points_inside(server, make_key):
    # The issue's attack: an allow-listed name that resolves to 127.0.0.1 fetched internal pages.
    def agent_with_http_fetch():
        agent = Agent.objects.create(name="web", model="local/demo")
        skill = Skill.objects.create(name="http_fetch", kind=Skill.Kind.BUILTIN,
                                     config={"allowed_hosts": ["localhost", f"localhost:{server.port}"]},
                                     **builtin_skill_defaults("http_fetch"))
        AgentSkill.objects.create(agent=agent, skill=skill)

    await orm(agent_with_http_fetch)
    key = await orm(make_key)

    response = await Api(key).post("/api/v1/agents/web/chat",
                                   {"message": f"fetch http://localhost:{server.port}/hello please"})

    assert response.status_code == 200
    [tool_call] = response.json()["tool_calls"]
    assert tool_call["name"] == "http_fetch" and tool_call["is_error"] is True
    assert tool_call["result"] == ("error: host 'localhost' resolves to 127.0.0.1, which is not a public address "
                                   "(loopback); only public addresses can be fetched")
    assert server.requests == []


# --- kind "http" skills ----------------------------------------------------------------------

def http_spec(url: str, **config) -> SkillSpec:
    return SkillSpec(name="weather", description="Weather", kind="http",
                     parameters={"type": "object", "properties": {"city": {"type": "string"}}},
                     config={"url": url, **config})


async def test_it_posts_arguments_as_json_to_http_skills(server, loopback_allowed):
    spec = http_spec(f"{server.base_url}/echo", headers={"X-Token": "tok-1"})

    result = await skill_execute(skill=spec, arguments='{"city": "Lyon"}', context=CONTEXT)

    assert result == ToolResult(content='{"received": {"city": "Lyon"}}')
    [request] = server.requests
    assert request["method"] == "POST"
    assert json.loads(request["body"]) == {"city": "Lyon"}
    assert request["headers"]["Content-Type"] == "application/json"
    assert request["headers"]["X-Token"] == "tok-1"
    assert request["headers"]["X-Request-Id"] == "req-123"


async def test_it_reports_non_2xx_answers_of_http_skills(server, loopback_allowed):
    result = await skill_execute(skill=http_spec(f"{server.base_url}/fail"), arguments={}, context=CONTEXT)

    assert result == ToolResult(content="error: the weather endpoint answered HTTP 503: weather service down",
                                is_error=True)


async def test_it_caps_http_skill_responses(server, loopback_allowed):
    result = await skill_execute(skill=http_spec(f"{server.base_url}/big"), arguments={}, context=CONTEXT)

    assert result.content == "y" * 100_000 + "\n[truncated after 100000 bytes]"


async def test_it_times_out_http_skills(server, loopback_allowed):
    result = await skill_execute(skill=http_spec(f"{server.base_url}/slow", timeout_seconds=0.2),
                                 arguments={}, context=CONTEXT)

    assert result == ToolResult(content="error: the weather endpoint did not answer within 0.2 s", is_error=True)


async def test_it_hides_the_endpoint_when_http_skills_are_unreachable(server, loopback_allowed):
    port = server.server_address[1]
    server.shutdown()
    server.server_close()

    result = await skill_execute(skill=http_spec(f"http://127.0.0.1:{port}/echo?token=s3cret"),
                                 arguments={}, context=CONTEXT)

    assert result == ToolResult(content="error: the weather endpoint could not be reached (ConnectError)",
                                is_error=True)


async def test_it_refuses_http_skill_endpoints_at_private_addresses(server):
    result = await skill_execute(skill=http_spec(f"http://localhost:{server.port}/echo?token=s3cret"),
                                 arguments={}, context=CONTEXT)

    assert result == ToolResult(content="error: the weather endpoint is not at a public address (loopback); "
                                        "HTTP_FETCH_ALLOW_PRIVATE_NETWORKS must list its network", is_error=True)
    assert server.requests == []


@pytest.mark.parametrize("config", [{"url": "file:///etc/passwd"}, {"url": ""}, {"url": "ftp://127.0.0.1/"},
                                    {"headers": {"X-Token": {"env": "TOKEN"}}}, {"timeout_seconds": "soon"}])
async def test_it_reports_misconfigured_http_skills(server, loopback_allowed, config):
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

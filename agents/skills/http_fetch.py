"""http_fetch: GET a web page from a host the skill's config allows.

Config: {"allowed_hosts": ["docs.example.com", "*.example.org", "wiki.example.net:8080"],
"timeout_seconds": 10, "max_bytes": 100000}. An empty or missing list allows nothing: an
operator opts hosts in, since the model chooses the URL and could otherwise reach internal
services. An entry without a port opens ports 80 and 443; "host:port" (or "[v6]:port")
opens that port only.

The URL is parsed by httpx, the same parser that makes the request, so the host we check
is the host we connect to. Where it points is checked too: the request goes through
agents/skills/outbound.py, which resolves the name once, refuses it when any address is not
public (loopback, private, link-local, metadata...; unless HTTP_FETCH_ALLOW_PRIVATE_NETWORKS
exempts it) and connects to the address it checked. Redirects are not followed (the Location
is reported instead), so an allowed host cannot bounce the request to one that is not: the
model may fetch the Location, which is then checked like any URL.
"""

from __future__ import annotations

import asyncio
import ipaddress
import math

import httpx

from agents.skills.base import SkillContext, SkillError
from agents.skills.outbound import DEFAULT_PORTS, http_url, outbound_stream

DEFAULT_TIMEOUT_SECONDS = 10.0
MAX_TIMEOUT_SECONDS = 30.0
DEFAULT_MAX_BYTES = 100_000
MAX_MAX_BYTES = 1_000_000
MAX_URL_CHARS = 2_000
USER_AGENT = "agent-platform-http-fetch/1.0"

_TEXT_TYPES = ("text/", "application/json", "application/xml", "application/javascript",
               "application/x-www-form-urlencoded")


# --- helpers shared with http_skill ------------------------------------------------------

def config_timeout(config: dict, *, default: float = DEFAULT_TIMEOUT_SECONDS,
                   maximum: float = MAX_TIMEOUT_SECONDS) -> float:
    value = config.get("timeout_seconds", default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise SkillError("skill misconfigured: timeout_seconds must be a positive number")
    return float(min(value, maximum))


def config_max_bytes(config: dict, *, default: int = DEFAULT_MAX_BYTES, maximum: int = MAX_MAX_BYTES) -> int:
    value = config.get("max_bytes", default)
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise SkillError("skill misconfigured: max_bytes must be a positive integer")
    return min(value, maximum)


async def read_capped(response: httpx.Response, max_bytes: int) -> tuple[bytes, bool]:
    """Up to max_bytes of the body, and whether there was more (we stop reading there)."""
    chunks: list[bytes] = []
    size = 0
    async for chunk in response.aiter_bytes():
        if size + len(chunk) > max_bytes:
            chunks.append(chunk[: max_bytes - size])
            return b"".join(chunks), True
        chunks.append(chunk)
        size += len(chunk)
    return b"".join(chunks), False


def decode_body(response: httpx.Response, body: bytes) -> str:
    try:
        return body.decode(response.charset_encoding or "utf-8", errors="replace")
    except LookupError:  # a charset Python does not know
        return body.decode("utf-8", errors="replace")


def is_text(content_type: str) -> bool:
    media_type = content_type.split(";", 1)[0].strip().lower()
    return (not media_type or media_type.startswith(_TEXT_TYPES)
            or media_type.endswith(("+json", "+xml")))


# --- host allow-list ---------------------------------------------------------------------

def _normalize_host(host: str) -> str:
    host = host.strip().lower().strip("[]").rstrip(".")
    if host.isascii():
        return host
    try:  # the form httpx connects to (IDNA), so "bücher.de" matches "xn--bcher-kva.de"
        return httpx.URL(f"http://{host}/").raw_host.decode("ascii").rstrip(".")
    except (httpx.InvalidURL, UnicodeError):
        return host


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _entry(entry: str) -> tuple[str, int | None]:
    """An allowed_hosts entry as (host, port or None): "h", "h:8080", "[::1]", "[::1]:8080", "::1"."""
    host, port = entry, None
    if entry.startswith("["):
        host, _, rest = entry[1:].partition("]")
        if rest:
            if not rest.startswith(":"):
                raise SkillError(f"skill misconfigured: allowed_hosts entry {entry!r} is not host or host:port")
            port = rest[1:]
    elif entry.count(":") == 1:  # more than one: a bare IPv6 address
        host, port = entry.split(":")
    if port is None:
        return host, None
    if not (port.isascii() and port.isdigit() and 0 < int(port) < 65536):
        raise SkillError(f"skill misconfigured: allowed_hosts entry {entry!r} has an invalid port")
    return host, int(port)


def allowed_ports(host: str, allowed_hosts: list[str]) -> set[int]:
    """The ports the allow-list opens on host (empty: the host is not on it).

    An entry matches by exact host, or "*.example.com" for any subdomain of example.com (not
    example.com itself); wildcards never match IP addresses ("*.0.0.1" must not open
    127.0.0.1). It opens its own port, or 80 and 443 when it names none.
    """
    host = _normalize_host(host)
    ports: set[int] = set()
    if not host:
        return ports
    wildcard_ok = not _is_ip(host)
    for entry in allowed_hosts:
        if not isinstance(entry, str) or not entry.strip():
            continue
        pattern, port = _entry(entry.strip())
        if pattern.startswith("*."):
            suffix = _normalize_host(pattern[2:])
            matched = wildcard_ok and bool(suffix) and host.endswith("." + suffix)
        else:
            matched = host == _normalize_host(pattern)
        if matched:
            ports |= {port} if port else {80, 443}
    return ports


def host_allowed(host: str, port: int, allowed_hosts: list[str]) -> bool:
    return port in allowed_ports(host, allowed_hosts)


def checked_url(raw: object, allowed_hosts: list[str]) -> httpx.URL:
    url = http_url(raw, max_chars=MAX_URL_CHARS)
    host = url.raw_host.decode("ascii", errors="replace")
    ports = allowed_ports(host, allowed_hosts)
    if not ports:
        raise SkillError(f"host {host!r} is not in this skill's allowed hosts")
    port = url.port or DEFAULT_PORTS[url.scheme]
    if port not in ports:
        raise SkillError(f"port {port} is not allowed for host {host!r} "
                         f"(allowed ports: {', '.join(map(str, sorted(ports)))})")
    return url


# --- the skill ---------------------------------------------------------------------------

class HttpFetch:
    name = "http_fetch"
    description = (
        "Fetch a web page or API response with an HTTP GET and return its status, content type and text. "
        "Only hosts the operator allowed, at public addresses, can be fetched; redirects are reported, not followed."
    )
    parameters = {
        "type": "object",
        "properties": {
            "url": {"type": "string", "description": "Absolute http(s) URL to GET.", "maxLength": MAX_URL_CHARS},
        },
        "required": ["url"],
    }

    async def run(self, arguments: dict, *, config: dict, context: SkillContext) -> str:
        method = arguments.get("method", "GET")
        if not isinstance(method, str) or method.upper() != "GET":
            raise SkillError("http_fetch only makes GET requests")
        allowed_hosts = config.get("allowed_hosts") or []
        if not isinstance(allowed_hosts, list):
            raise SkillError("skill misconfigured: allowed_hosts must be a list of host names")
        url = checked_url(arguments.get("url"), allowed_hosts)
        timeout = config_timeout(config)
        max_bytes = config_max_bytes(config)
        headers = {"User-Agent": USER_AGENT, "Accept": "text/html, text/plain, application/json, */*;q=0.5",
                   # Uncompressed, so max_bytes bounds what we decompress as well as what we read.
                   "Accept-Encoding": "identity"}
        try:
            # httpx's timeout applies per operation; the outer one bounds the whole exchange,
            # so a server dripping one byte at a time cannot hold the run.
            async with asyncio.timeout(timeout):
                async with outbound_stream("GET", url, timeout=timeout, headers=headers) as response:
                    content_type = response.headers.get("content-type", "")
                    if response.is_redirect:
                        location = response.headers.get("location", "")
                        target = str(url.join(location)) if location else "(no Location header)"
                        return (f"HTTP {response.status_code}\n{content_type}\n\n"
                                f"Redirect not followed. Location: {target}")
                    body, truncated = await read_capped(response, max_bytes)
        except (TimeoutError, httpx.TimeoutException) as exc:
            raise SkillError(f"request timed out after {timeout:g} s") from exc
        except httpx.HTTPError as exc:
            raise SkillError(f"request failed: {type(exc).__name__}: {exc}") from exc
        if is_text(content_type):
            text = decode_body(response, body)
        else:
            text = f"[binary content ({content_type}), {len(body)} bytes not shown]"
        if truncated:
            text += f"\n[truncated after {max_bytes} bytes]"
        return f"HTTP {response.status_code}\n{content_type}\n\n{text}"

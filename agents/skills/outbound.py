"""The one way skills make outbound HTTP: to public addresses only, over a connection to the
address that was checked.

A host name on an allow-list says nothing about where it points: "docs.example.com" may
resolve to 127.0.0.1, 10.0.0.5 or 169.254.169.254 (cloud metadata), today or once its TTL
runs out (DNS rebinding). So the name is resolved once, in the event loop's resolver thread
(no blocking DNS on the loop); every address it resolves to must be public, or the request
is refused; and the connection goes to one of those very addresses: httpx is handed the URL
with the checked IP in place of the name, while the Host header and TLS (SNI and certificate
verification, through httpcore's "sni_hostname" request extension) still use the name. No
second lookup happens, so a rebinding DNS server gets no chance to answer differently.

Refused, IPv4 and IPv6: loopback, private, link-local, multicast, unspecified, reserved,
shared (100.64.0.0/10), documentation and every other range that ipaddress does not call
global. IPv4-mapped addresses (::ffff:127.0.0.1) are judged, and connected to, as the IPv4
address they carry; 6to4 addresses (2002::/16) are refused when the IPv4 address they carry
would be. Literal IPs in the URL, and the numeric forms the resolver accepts (2130706433,
0x7f.1, 127.1), resolve to themselves and are judged the same way. The networks listed in
HTTP_FETCH_ALLOW_PRIVATE_NETWORKS (an internal wiki, a test server) are exempt.

Environment proxies (HTTP_PROXY and friends) are not used: through a proxy we could not know
where a request lands. SSL_CERT_FILE / SSL_CERT_DIR still name the trusted CAs, as httpx's
defaults do. Redirects are never followed here; the caller decides what a 3xx means.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager

import httpx
from django.conf import settings

from agents.skills.base import SkillError

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

DEFAULT_PORTS = {"http": 80, "https": 443}

_KINDS = (("unspecified", "is_unspecified"), ("loopback", "is_loopback"), ("link-local", "is_link_local"),
          ("multicast", "is_multicast"), ("private", "is_private"), ("reserved", "is_reserved"))


class AddressRefused(SkillError):
    """The host is, or resolves to, an address skills may not reach."""

    def __init__(self, host: str, address: IPAddress, kind: str) -> None:
        self.host, self.address, self.kind = host, address, kind
        subject = f"{address}" if _same_address(host, address) else f"host {host!r} resolves to {address}, which"
        super().__init__(f"{subject} is not a public address ({kind}); only public addresses can be fetched")


class HostUnresolved(SkillError):
    def __init__(self, host: str) -> None:
        self.host = host
        super().__init__(f"host {host!r} could not be resolved")


def http_url(raw: object, *, max_chars: int = 2000, what: str = "url") -> httpx.URL:
    """`raw` parsed by httpx (the parser that makes the request, so the host checked is the host
    connected to): an absolute http(s) URL with a host and no credentials (user:password@).
    Raises SkillError naming what is wrong; says nothing about where the host points."""
    if not isinstance(raw, str) or not raw.strip():
        raise SkillError(f"{what} must be a non-empty string")
    if len(raw) > max_chars:
        raise SkillError(f"{what} is longer than {max_chars} characters")
    try:
        url = httpx.URL(raw.strip())
    except httpx.InvalidURL as exc:
        raise SkillError(f"invalid {what}: {exc}") from exc
    if url.scheme not in ("http", "https"):
        raise SkillError("only http and https URLs can be fetched" if what == "url"
                         else f"{what} must be an http or https URL")
    if url.userinfo:
        raise SkillError("URLs with credentials (user:password@) are not allowed")
    if not url.raw_host:
        raise SkillError(f"{what} has no host")
    return url


async def public_url_check(url: httpx.URL) -> None:
    """Refuse (AddressRefused, HostUnresolved) a URL whose host is not at a public address, as
    outbound_stream would, without connecting: for URLs given now and used later (async-run
    callbacks), which outbound_stream checks again when it connects."""
    await resolve_public(url.raw_host.decode("ascii"), url.port or DEFAULT_PORTS[url.scheme])


def _same_address(host: str, address: IPAddress) -> bool:
    try:
        return ipaddress.ip_address(host) == address
    except ValueError:
        return False


def _kind(address: IPAddress) -> str | None:
    if address.is_global and not address.is_multicast and not address.is_reserved:
        return None
    return next((kind for kind, flag in _KINDS if getattr(address, flag)), "non-public")


def address_refusal(address: IPAddress, allowed_networks: Iterable[IPNetwork] = ()) -> str | None:
    """Why skills may not connect to this address ("loopback", "private", ...), or None if they may."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
        address = address.ipv4_mapped
    if any(address in network for network in allowed_networks):
        return None
    kind = _kind(address)
    if kind is None and isinstance(address, ipaddress.IPv6Address) and address.sixtofour:
        kind = _kind(address.sixtofour)  # 2002:7f00:1:: carries 127.0.0.1
    return kind


async def resolve_public(host: str, port: int) -> list[IPAddress]:
    """Every address host resolves to, in the resolver's order, IPv4-mapped ones as IPv4.

    Raises AddressRefused if any of them is not public (nor in an allowed network): one bad
    record is enough, since we cannot know which one a later lookup would pick.
    """
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError) as exc:  # socket.gaierror is an OSError
        raise HostUnresolved(host) from exc
    allowed_networks = settings.HTTP_FETCH_ALLOW_PRIVATE_NETWORKS
    addresses: list[IPAddress] = []
    for *_, sockaddr in infos:
        try:
            address = ipaddress.ip_address(sockaddr[0])
        except ValueError:
            continue  # not an IP socket address (AF_UNIX and friends never come back for TCP)
        kind = address_refusal(address, allowed_networks)
        if kind is not None:
            raise AddressRefused(host, address, kind)
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
            address = address.ipv4_mapped
        if address not in addresses:
            addresses.append(address)
    if not addresses:
        raise HostUnresolved(host)
    return addresses


@asynccontextmanager
async def outbound_stream(method: str, url: httpx.URL, *, timeout: float, headers: dict[str, str],
                          content: bytes | None = None) -> AsyncIterator[httpx.Response]:
    """Send one request to a public address of url's host and yield the streamed response.

    Raises AddressRefused / HostUnresolved (SkillErrors) before any connection is made, and
    httpx errors as httpx raises them. The addresses are tried in the resolver's order while
    connecting fails (an IPv6 address on a host without IPv6 routing, say).
    """
    host = url.raw_host.decode("ascii")
    addresses = await resolve_public(host, url.port or DEFAULT_PORTS[url.scheme])
    request_headers = httpx.Headers(headers)
    request_headers.setdefault("Host", url.netloc.decode("ascii"))  # the name (and port), not the IP
    extensions = {"sni_hostname": host} if url.scheme == "https" else {}
    async with httpx.AsyncClient(timeout=timeout, follow_redirects=False, trust_env=False,
                                 verify=httpx.create_ssl_context(trust_env=True)) as client:
        for position, address in enumerate(addresses, start=1):
            request = client.build_request(method, url.copy_with(host=str(address)), headers=request_headers,
                                           content=content, extensions=extensions)
            try:
                response = await client.send(request, stream=True)
                break
            except httpx.ConnectError:
                if position == len(addresses):
                    raise
        try:
            yield response
        finally:
            await response.aclose()

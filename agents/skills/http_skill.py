"""Skills of kind "http": the model's arguments are POSTed as JSON to an operator's endpoint.

Config: {"url": "https://tools.internal/weather", "headers": {"X-Token": "..."},
"timeout_seconds": 10}. The response text (first 100 kB) is the tool's result; a non-2xx
answer is an error result carrying the status.

Headers are literal strings only. Reading a secret from an environment variable named in
the config would mean reading os.environ outside settings.py, which nothing may do; a
header secret therefore lives in the Skill row (admin-only) until settings grow a place
for skill secrets. Error messages never echo the URL or headers, since either may hold one.

The endpoint is reached through agents/skills/outbound.py, as http_fetch's pages are: a name
that resolves to a loopback, private, link-local or other non-public address is refused
unless HTTP_FETCH_ALLOW_PRIVATE_NETWORKS lists its network (an internal tool server's), and
the connection goes to the address that was checked.
"""

from __future__ import annotations

import asyncio
import json

import httpx

from agents.skills.base import SkillContext, SkillError, SkillSpec
from agents.skills.http_fetch import config_timeout, decode_body, read_capped
from agents.skills.outbound import AddressRefused, HostUnresolved, outbound_stream

MAX_RESPONSE_BYTES = 100_000
ERROR_BODY_CHARS = 500
USER_AGENT = "agent-platform-http-skill/1.0"


def _endpoint(config: dict) -> httpx.URL:
    raw = config.get("url")
    if not isinstance(raw, str) or not raw.strip():
        raise SkillError("skill misconfigured: config.url is missing")
    try:
        url = httpx.URL(raw.strip())
    except httpx.InvalidURL as exc:
        raise SkillError("skill misconfigured: config.url is not a valid URL") from exc
    if url.scheme not in ("http", "https") or not url.raw_host:
        raise SkillError("skill misconfigured: config.url must be an http(s) URL")
    return url


def _headers(config: dict, context: SkillContext) -> dict[str, str]:
    configured = config.get("headers") or {}
    if not isinstance(configured, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in configured.items()
    ):
        raise SkillError("skill misconfigured: config.headers must map header names to string values")
    headers = {"User-Agent": USER_AGENT, "Accept": "application/json, text/plain, */*;q=0.5",
               "Accept-Encoding": "identity", "X-Agent-Name": context.agent_name}
    if context.request_id:
        headers["X-Request-Id"] = context.request_id
    headers.update(configured)
    return headers


async def http_skill_run(*, skill: SkillSpec, arguments: dict, context: SkillContext) -> str:
    """POST the arguments to the skill's endpoint and return its answer as text."""
    config = skill.config or {}
    url = _endpoint(config)
    headers = _headers(config, context)
    timeout = config_timeout(config)
    try:
        payload = json.dumps(arguments)
    except (TypeError, ValueError) as exc:
        raise SkillError("arguments cannot be sent as JSON") from exc
    headers["Content-Type"] = "application/json"
    try:
        async with asyncio.timeout(timeout):
            # No redirects (outbound_stream never follows one): a 3xx would re-send the
            # configured headers wherever it points.
            async with outbound_stream("POST", url, timeout=timeout, headers=headers,
                                       content=payload.encode()) as response:
                body, truncated = await read_capped(response, MAX_RESPONSE_BYTES)
    except AddressRefused as exc:
        raise SkillError(f"the {skill.name} endpoint is not at a public address ({exc.kind}); "
                         "HTTP_FETCH_ALLOW_PRIVATE_NETWORKS must list its network") from exc
    except HostUnresolved as exc:
        raise SkillError(f"the {skill.name} endpoint's host could not be resolved") from exc
    except (TimeoutError, httpx.TimeoutException) as exc:
        raise SkillError(f"the {skill.name} endpoint did not answer within {timeout:g} s") from exc
    except httpx.HTTPError as exc:
        raise SkillError(f"the {skill.name} endpoint could not be reached ({type(exc).__name__})") from exc
    text = decode_body(response, body)
    if not response.is_success:
        excerpt = text[:ERROR_BODY_CHARS].strip()
        raise SkillError(f"the {skill.name} endpoint answered HTTP {response.status_code}"
                         + (f": {excerpt}" if excerpt else ""))
    if truncated:
        text += f"\n[truncated after {MAX_RESPONSE_BYTES} bytes]"
    return text

"""WebSocket chat: `ws/agents/{name}/chat/`, the third transport over agents.pipeline.ChatTurn.

Every turn runs through the same pipeline as REST, SSE and the OpenAI-compatible endpoint
(transport "websocket", always streamed), so guards, the `streaming` flag, rate limits, budgets,
audit, key usage and metering apply alike. The protocol (the README's "WebSocket" section):

Authentication, in this order:
  * `Authorization: Bearer <key>` (or `X-API-Key`) on the handshake: server clients;
  * the admin's Django session, for active staff users (the chat console), honoured only when
    the handshake's Origin is this site's own (same host as the Host header, or listed in
    CSRF_TRUSTED_ORIGINS): a page on another site cannot ride a staff member's cookie
    (cross-site WebSocket hijacking). Turns run with no API key: ChatTurn(principal=None,
    user_id=...), audited as `user:<username>`;
  * else a first frame `{"type": "auth", "key": "..."}` within WS_AUTH_TIMEOUT_SECONDS
    (browsers on other sites, which can send neither header nor cookie).
  The connection is accepted first and then closed with a code a client can read:
  4401 missing/invalid/revoked key, 4403 authenticated but refused (a non-staff session user,
  the `streaming` flag off), 4404 unknown or disabled agent or one the key may not use (as REST's
  404: a key learns nothing about agents it is not given), 4408 idle (WS_IDLE_TIMEOUT_SECONDS).
  A handshake whose Host is not in ALLOWED_HOSTS is refused outright (HTTP 403).

Client frames: message {content, session_id?, idempotency_key?, metadata?}, cancel, ping {id?}.
Server frames: ready, start, delta, tool_call, tool_result, usage, done, error, pong.

One turn at a time per connection. The turn runs in a task of its own, so the receive loop stays
responsive while it streams (ping → pong, cancel, a second message → error `turn_in_progress`).
`cancel` (and a client disconnect) cancels that task: the upstream stream is closed (the
provider's `finally`), the pipeline stores the run as cancelled with what was produced, billing
meters it (the in-flight call estimated), and the turn ends with `done` carrying
`"cancelled": true`. `done` (and a turn's `error`) is sent once the run is stored, so the next
message — on this or another connection, on any worker — sees the whole conversation.

Per-turn refusals (validation, rate limit with `retry_after`, budget, guard, unknown session)
are error frames and the connection stays open. Nothing a client sends raises: malformed
frames get error frames with a code.

Multi-worker: turns need nothing from the worker that served the previous one (sessions live in
the database), and every authenticated connection joins a channel-layer group (`ws.key.<id>` or
`ws.user.<id>`), so any process can close a key's or a user's connections on every worker
through channels-redis (`websocket_close_for`).
"""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from urllib.parse import urlsplit

from channels.generic.websocket import AsyncWebsocketConsumer
from channels.layers import get_channel_layer
from django.conf import settings
from django.http.request import is_same_domain, split_domain_port, validate_host
from django.utils.datastructures import CaseInsensitiveMapping

from agentplatform import metrics, tracing
from agentplatform.errors import AuthenticationFailed, InvalidRequest, NotFound, PermissionDenied, PlatformError
from agentplatform.jsonparse import loads_strict
from agentplatform.logs import request_id_var
from governance.idempotency import (
    idempotency_claim,
    idempotency_fingerprint,
    idempotency_release,
    idempotency_store,
)
from governance.selectors import presented_key

from .chat_input import ChatInput, websocket_chat_input
from .models import Run
from .pipeline import ChatTurn, principal_and_agent
from .streaming import done_event, error_event, start_event, turn_error_event

logger = logging.getLogger("agents.consumers")

# Close codes (4000-4999 are the application's; they mirror the HTTP statuses).
CLOSE_UNAUTHENTICATED = 4401
CLOSE_FORBIDDEN = 4403
CLOSE_NOT_FOUND = 4404
CLOSE_IDLE = 4408

MAX_KEY_CHARS = 512
# How a turn's frames are stored for idempotent replays (IdempotencyRecord.content_type).
FRAMES_CONTENT_TYPE = "application/vnd.agentplatform.ws-frames+json"
_DUMPS = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, default=str).encode


def _headers(scope: dict) -> CaseInsensitiveMapping:
    return CaseInsensitiveMapping({name.decode("latin-1"): value.decode("latin-1")
                                   for name, value in scope.get("headers", ())})


def host_allowed(headers) -> bool:
    """The Host header is one of ALLOWED_HOSTS (as Django checks it for HTTP); no Host: allowed."""
    host = headers.get("Host")
    if not host:
        return True
    allowed = settings.ALLOWED_HOSTS or (["localhost", "127.0.0.1", "[::1]"] if settings.DEBUG else [])
    domain, _ = split_domain_port(host)
    return bool(domain) and validate_host(domain, allowed)


def origin_trusted(headers) -> bool:
    """Whether a session cookie may authenticate this handshake: the browser's Origin is this
    site (its host:port is the Host header) or one of CSRF_TRUSTED_ORIGINS (wildcards as in
    Django's CSRF check). No Origin (not a browser): no."""
    origin = headers.get("Origin")
    if not origin or origin == "null":
        return False
    try:
        parsed = urlsplit(origin)
    except ValueError:
        return False
    if not parsed.scheme or not parsed.netloc:
        return False
    netloc = parsed.netloc.lower()
    host = (headers.get("Host") or "").lower()
    if host and netloc == host:
        return True
    for trusted in settings.CSRF_TRUSTED_ORIGINS:
        t = urlsplit(trusted.lower())
        if t.scheme != parsed.scheme.lower():
            continue
        if t.netloc == netloc or (t.netloc.startswith("*") and is_same_domain(netloc, t.netloc[1:])):
            return True
    return False


def _client_ip(scope: dict, headers) -> str | None:
    if settings.TRUST_X_FORWARDED_FOR:
        first = (headers.get("X-Forwarded-For") or "").split(",")[0].strip()
        if first:
            return first[:45]
    client = scope.get("client")
    return client[0] if client else None


def ws_group(*, key_id: int | None = None, user_id: int | None = None) -> str:
    """The channel-layer group of every WebSocket connection of one API key or one staff user."""
    return f"ws.key.{key_id}" if key_id is not None else f"ws.user.{user_id}"


async def websocket_close_for(*, key_id: int | None = None, user_id: int | None = None,
                              code: int = CLOSE_UNAUTHENTICATED, message: str = "The connection was closed.") -> None:
    """Close every WebSocket chat connection of an API key (e.g. after a revocation) or a staff
    user, on every worker (through the channel layer: channels-redis with REDIS_URL). A running
    turn is cancelled and stored first."""
    layer = get_channel_layer()
    if layer is not None:
        await layer.group_send(ws_group(key_id=key_id, user_id=user_id),
                               {"type": "ws.close", "code": code, "message": message})


def _fingerprint(agent_name: str, data: ChatInput) -> str:
    """What makes two message frames "the same request" for idempotency: agent, content, the
    session_id as sent (absent and null differ) and metadata."""
    session = _DUMPS({"session_id": str(data.session_id) if data.session_id else None, "has": data.has_session})
    return idempotency_fingerprint(b"websocket", agent_name.encode(), data.messages[0]["content"].encode(),
                                   session.encode(), _DUMPS(data.metadata).encode())


class _Refused(Exception):
    """The connection cannot go on: send `error`, close with `close_code`."""

    def __init__(self, error: PlatformError, close_code: int) -> None:
        super().__init__(error.message)
        self.error = error
        self.close_code = close_code


class AgentChatConsumer(AsyncWebsocketConsumer):
    """One chat connection to one agent (see the module docstring for the protocol)."""

    # --- connection ---------------------------------------------------------------------

    async def connect(self) -> None:
        self.agent_name: str = self.scope["url_route"]["kwargs"]["name"]
        self.key: str | None = None
        self.user_id: int | None = None
        self.auth: str | None = None
        self.session_id: uuid.UUID | None = None
        self.closed = False
        self.turn_task: asyncio.Task | None = None
        self.phase = "idle"   # idle | preparing | waiting | streaming | finishing
        self.cancel_requested = False
        self.refused_session_user = False
        self._timers: dict[str, asyncio.TimerHandle] = {}
        self._background: set[asyncio.Task] = set()
        self._stored: list[dict] | None = None
        self._claim_held: int | None = None
        self.turn: ChatTurn | None = None
        headers = _headers(self.scope)
        self.client_ip = _client_ip(self.scope, headers)
        if not host_allowed(headers):
            await self.close()  # before accept: the handshake is refused (HTTP 403)
            self.closed = True
            return
        await self.accept()
        try:
            key = presented_key(headers)
            if key:
                await self._authenticate_key(key)
                return
            if settings.SESSION_COOKIE_NAME in self.scope.get("cookies", {}) and origin_trusted(headers):
                if await self._authenticate_session():
                    return
            self._schedule("auth", settings.WS_AUTH_TIMEOUT_SECONDS, self._auth_timed_out)
        except _Refused as refused:
            await self._refuse(refused)

    async def _authenticate_key(self, key: str) -> None:
        principal, agent = await principal_and_agent(key, self.agent_name)
        if principal is None:
            raise _Refused(AuthenticationFailed(), CLOSE_UNAUTHENTICATED)
        self._check_agent(agent, principal)
        self.key = key
        await self._authenticated("key", ws_group(key_id=principal.key_id))

    async def _authenticate_session(self) -> bool:
        from channels.auth import get_user

        user = await get_user(self.scope)
        if not user.is_authenticated:
            return False
        if not (user.is_active and user.is_staff):
            # Logged in, but the console is for staff: an API key (auth frame) may still do.
            self.refused_session_user = True
            return False
        _, agent = await principal_and_agent(None, self.agent_name)
        self._check_agent(agent, None)
        self.user_id = user.pk
        await self._authenticated("session", ws_group(user_id=user.pk))
        return True

    def _check_agent(self, agent, principal) -> None:
        if agent is None or not agent.enabled or (principal is not None and not principal.may_use_agent(agent.name)):
            raise _Refused(NotFound(f"No agent named {self.agent_name!r}.", code="agent_not_found", param="agent"),
                           CLOSE_NOT_FOUND)

    async def _authenticated(self, how: str, group: str) -> None:
        self.auth = how
        self._cancel_timer("auth")
        if self.channel_layer is not None:
            await self.channel_layer.group_add(group, self.channel_name)
            self.groups.append(group)  # left again in websocket_disconnect
        ready = {"type": "ready", "agent": self.agent_name, "auth": how,
                 "max_frame_bytes": settings.WS_MAX_FRAME_BYTES}
        outage = getattr(self.channel_layer, "outage", None)  # agentplatform.channels
        if outage is not None and outage.since is not None:
            # Redis is down: this connection streams, but nothing reaches it from other workers.
            ready["degraded"] = ["channel_layer"]
        await self._send(ready)
        self._touch()

    async def _auth_timed_out(self) -> None:
        if self.auth is None and not self.closed:
            await self._refuse(_Refused(self._unauthenticated_error(
                f"No credentials: send `Authorization: Bearer <key>` on the handshake or a first frame "
                f'{{"type": "auth", "key": ...}} within {settings.WS_AUTH_TIMEOUT_SECONDS:g} s.'),
                CLOSE_FORBIDDEN if self.refused_session_user else CLOSE_UNAUTHENTICATED))

    def _unauthenticated_error(self, message: str) -> PlatformError:
        if self.refused_session_user:
            return PermissionDenied("The chat console is for staff users; others authenticate with an API key.",
                                    code="staff_only")
        return AuthenticationFailed(message, code="authentication_required")

    async def _refuse(self, refused: _Refused) -> None:
        await self._send(error_event(refused.error))
        await self._close(refused.close_code, refused.error.code)

    async def _close(self, code: int, reason: str = "") -> None:
        if self.closed:
            return
        self.closed = True
        for name in list(self._timers):
            self._cancel_timer(name)
        await self.close(code=code, reason=reason[:120] or None)

    async def disconnect(self, code: int) -> None:
        # The client left (or we closed): a running turn ends as a cancel does, stored and metered.
        self.closed = True
        for name in list(getattr(self, "_timers", {})):
            self._cancel_timer(name)
        task = getattr(self, "turn_task", None)
        if task is not None and not task.done():
            self._request_cancel()
            try:
                await asyncio.shield(task)
            except BaseException:  # the task handles its own errors; never raise out of here
                pass

    # --- frames from the client -----------------------------------------------------------

    async def receive(self, text_data: str | None = None, bytes_data: bytes | None = None) -> None:
        try:
            await self._receive(text_data, bytes_data)
        except _Refused as refused:
            await self._refuse(refused)
        except PlatformError as error:
            await self._send(error_event(error))
        except Exception:  # a bug: logged here, a generic error frame for the client, never a crash
            logger.exception("WebSocket frame failed on agent %s", self.agent_name)
            await self._send(error_event(PlatformError()))

    async def _receive(self, text_data: str | None, bytes_data: bytes | None) -> None:
        if self.closed:
            return
        self._touch()
        if text_data is None:
            raise InvalidRequest("Binary frames are not supported: send JSON text frames.", code="unsupported_frame")
        limit = settings.WS_MAX_FRAME_BYTES
        if len(text_data) > limit or (len(text_data) * 4 > limit and len(text_data.encode()) > limit):
            raise InvalidRequest(f"Frames are limited to {limit} bytes.", code="frame_too_large",
                                 details={"max_frame_bytes": limit})
        frame = loads_strict(text_data)
        if not isinstance(frame, dict):
            raise InvalidRequest("A frame must be a JSON object with a `type`.", code="invalid_json")
        kind = frame.get("type")
        if not isinstance(kind, str):
            raise InvalidRequest("A frame needs a string `type`.", code="invalid_frame", param="type")
        if self.auth is None:
            await self._on_auth_frame(kind, frame)
            return
        if kind == "message":
            await self._on_message(frame)
        elif kind == "cancel":
            self._request_cancel()  # nothing running: nothing to do (a cancel racing the turn's end)
        elif kind == "ping":
            pong = {"type": "pong"}
            if isinstance(frame.get("id"), (str, int)) and not isinstance(frame.get("id"), bool):
                pong["id"] = frame["id"]
            await self._send(pong)
        elif kind == "auth":
            raise InvalidRequest("This connection is authenticated already.", code="already_authenticated")
        else:
            raise InvalidRequest(f"Unknown frame type {kind[:40]!r}: send message, cancel or ping.",
                                 code="unknown_frame_type", param="type")

    async def _on_auth_frame(self, kind: str, frame: dict) -> None:
        if kind != "auth":
            raise _Refused(self._unauthenticated_error(
                "Authenticate first: the first frame must be {\"type\": \"auth\", \"key\": ...} (or send the key "
                "in the handshake's Authorization header)."),
                CLOSE_FORBIDDEN if self.refused_session_user else CLOSE_UNAUTHENTICATED)
        key = frame.get("key")
        if not isinstance(key, str) or not key or len(key) > MAX_KEY_CHARS:
            raise _Refused(AuthenticationFailed(), CLOSE_UNAUTHENTICATED)
        await self._authenticate_key(key)

    async def _on_message(self, frame: dict) -> None:
        if self.turn_task is not None:
            raise InvalidRequest("A turn is running on this connection: wait for its `done` (or send `cancel`).",
                                 code="turn_in_progress")
        data = websocket_chat_input(frame)
        if data.idempotency_key is not None and self.auth != "key":
            raise InvalidRequest("idempotency_key needs a connection authenticated with an API key.",
                                 code="idempotency_unavailable", param="idempotency_key")
        self.cancel_requested = False
        self.phase = "preparing"
        self.turn_task = asyncio.create_task(tracing.traced_task(self._turn(data), "websocket turn",
                                                                 {"gen_ai.agent.name": self.agent_name}))

    def _cancel_if_streaming(self, task: asyncio.Task) -> None:
        if self._cancellable() and not task.done():
            task.cancel()

    def _cancellable(self) -> bool:
        """Waiting for a duplicate idempotent turn, or streaming a run that has not ended (once it
        ended, what remains is storing it: a cancel must not cut that short)."""
        if self.phase == "waiting":
            return True
        return self.phase == "streaming" and not (self.turn is not None and self.turn.ended)

    def _request_cancel(self) -> None:
        task = self.turn_task
        if task is None or task.done() or self.cancel_requested:
            return
        self.cancel_requested = True
        # While preparing (stages reserving budgets, counting rate limits) the turn is not
        # interrupted: it is cancelled as soon as it starts streaming (see _stream).
        if self._cancellable():
            task.cancel()

    # --- one turn ---------------------------------------------------------------------------

    async def _turn(self, data: ChatInput) -> None:
        request_id = f"req_{uuid.uuid4().hex}"
        request_id_var.set(request_id)  # this task's log records carry it (agentplatform.logs)
        close_code: int | None = None
        try:
            final = await self._run_turn(data, request_id)
        except _Refused as refused:
            final, close_code = [error_event(refused.error, request_id)], refused.close_code
        except PlatformError as error:
            final = [error_event(error, request_id)]
            if error.http_status == 403:  # e.g. the `streaming` flag is off: no turn can ever run
                close_code = CLOSE_FORBIDDEN
        except asyncio.CancelledError:
            # Cancelled while waiting for a duplicate idempotent turn to finish: nothing ran.
            asyncio.current_task().uncancel()
            final = [{"type": "done", "run_id": None, "session_id": None, "cancelled": True,
                      "usage": {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}}]
        except Exception:
            logger.exception("WebSocket turn failed on agent %s (request %s)", self.agent_name, request_id)
            final = [error_event(PlatformError(), request_id)]
        finally:
            self.turn = None
            if self._claim_held is not None:
                await idempotency_release(self._claim_held)
                self._claim_held = None
        await self._finish_turn(final)
        if close_code is not None:
            await self._close(close_code, final[-1].get("code", ""))

    async def _run_turn(self, data: ChatInput, request_id: str) -> list[dict]:
        principal, agent = await principal_and_agent(self.key, self.agent_name)
        if self.auth == "key" and principal is None:  # revoked, expired or rotated out since
            raise _Refused(AuthenticationFailed("This API key is no longer valid."), CLOSE_UNAUTHENTICATED)
        self._check_agent(agent, principal)
        if data.idempotency_key is not None:
            self.phase = "waiting"  # a duplicate waits for the first, and may be cancelled meanwhile
            try:
                claim, record = await idempotency_claim(api_key_id=principal.key_id, key=data.idempotency_key,
                                                        fingerprint=_fingerprint(self.agent_name, data),
                                                        param="idempotency_key")
            finally:
                self.phase = "preparing"
            if record is not None:
                return await self._replay(record)
            self._claim_held = claim
        turn = ChatTurn(principal=principal, agent=agent, input_messages=data.messages,
                        transport=Run.Transport.WEBSOCKET, stream=True, request_id=request_id,
                        session_id=data.session_id if data.has_session else self.session_id,
                        metadata=data.metadata, user_id=self.user_id, client_ip=self.client_ip)
        self.phase = "preparing"
        await turn.prepare()
        final = await self._stream(turn, store=self._claim_held is not None)
        if self._claim_held is not None and final[-1]["type"] == "done" and not final[-1]["cancelled"]:
            # Stored before `done` goes out: a retry after `done` replays, never runs again.
            try:
                await idempotency_store(self._claim_held, status=200, content_type=FRAMES_CONTENT_TYPE,
                                        headers={}, body=_DUMPS(self._stored).encode())
                self._claim_held = None
            except Exception:  # the answer stands; a retry will run again (the claim is released)
                logger.exception("Could not store the frames of idempotent run %s", turn.run_id)
        return final

    async def _finish_turn(self, final: list[dict]) -> None:
        """Free the turn slot, then send the turn's last frame(s): a client that answers `done`
        with its next message must not hit `turn_in_progress`."""
        self.turn_task = None
        self.phase = "idle"
        self._touch()
        for frame in final:
            await self._send(frame)

    async def _stream(self, turn: ChatTurn, *, store: bool) -> list[dict]:
        """Send the turn's events; return its last frame (`done` or `error`, which the pipeline
        yields once the run is stored), sent by the caller."""
        self.session_id = turn.session_id
        self.turn = turn
        start = start_event(turn)
        self._stored: list[dict] | None = [start] if store else None
        await self._send(start)
        task = asyncio.current_task()
        self.phase = "streaming"
        if self.cancel_requested:
            # Cancelled while preparing: start the run (so the pipeline stores it as cancelled and
            # its stages release what they hold) and cancel it at its first wait.
            asyncio.get_running_loop().call_soon(self._cancel_if_streaming, task)
        last: dict | None = None
        cancelled = False
        events = turn.events()
        metrics.stream_opened("websocket")
        try:
            async for event in events:
                kind = event["type"]
                if kind in ("done", "error"):
                    last = event
                    continue
                if self._stored is not None:
                    self._keep(event)
                await self._send_text(_DUMPS(event))
                if self.cancel_requested and self._cancellable():
                    # The cancel's task.cancel() can be lost: redis-py 8 swallows a cancellation
                    # that lands early in a command (a circuit or rate-limit call). Apply it here.
                    raise asyncio.CancelledError
                # Give the loop back after every frame: when the upstream's data is already
                # buffered nothing here suspends, and one stream would run its whole backlog while
                # new turns wait. Measured (bench/ws_bench.py, 1,000 streams on one process): time
                # to first token +4 s instead of +14 s, for ~25% more CPU under that overload.
                await asyncio.sleep(0)
        except asyncio.CancelledError:
            task.uncancel()
            cancelled = True
        finally:
            self.phase = "finishing"
            metrics.stream_closed("websocket")
            await events.aclose()
        if cancelled or turn.status == Run.Status.CANCELLED or last is None:
            return [done_event(turn, cancelled=True)]
        if last["type"] == "error":
            return [turn_error_event(turn, last)]
        done = done_event(turn)
        if self._stored is not None:
            self._stored.append(done)
        return [done]

    def _keep(self, event: dict) -> None:
        """Remember a frame for idempotent replays; consecutive deltas are kept as one."""
        stored = self._stored
        if event["type"] == "delta" and stored and stored[-1]["type"] == "delta":
            stored[-1] = {"type": "delta", "content": stored[-1]["content"] + event["content"]}
        else:
            stored.append(dict(event))

    # --- idempotent replays ---------------------------------------------------------------

    async def _replay(self, record: dict) -> list[dict]:
        if record.get("content_type") != FRAMES_CONTENT_TYPE:
            raise InvalidRequest("This idempotency_key was used with a different request.",
                                 code="idempotency_key_reused", param="idempotency_key")
        frames = json.loads(bytes(record["body"]))
        for frame in frames[:-1]:
            if frame.get("type") == "start":
                frame = {**frame, "replayed": True}
            await self._send(frame)
        return [{**frames[-1], "replayed": True}]

    # --- pushed from the channel layer -----------------------------------------------------

    async def ws_close(self, event: dict) -> None:
        """`websocket_close_for(...)` on any worker: cancel (and store) a running turn, then close."""
        task = self.turn_task
        if task is not None and not task.done():
            self._request_cancel()
            await asyncio.shield(task)
        code = int(event.get("code") or CLOSE_UNAUTHENTICATED)
        await self._send({"type": "error", "code": "connection_closed",
                          "message": str(event.get("message") or "The connection was closed."), "status": None,
                          "request_id": None})
        await self._close(code, "connection_closed")

    # --- sending, timers ---------------------------------------------------------------------

    async def _send(self, frame: dict) -> None:
        await self._send_text(_DUMPS(frame))

    async def _send_text(self, text: str) -> None:
        if not self.closed:
            await self.send(text_data=text)

    def _schedule(self, name: str, delay: float, callback) -> None:
        self._cancel_timer(name)
        if delay and delay > 0:
            self._timers[name] = asyncio.get_running_loop().call_later(delay, self._fire, callback)

    def _fire(self, callback) -> None:
        task = asyncio.ensure_future(callback())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def _cancel_timer(self, name: str) -> None:
        timer = self._timers.pop(name, None)
        if timer is not None:
            timer.cancel()

    def _touch(self) -> None:
        """Restart the idle timer (a frame arrived, or a turn ended)."""
        if settings.WS_IDLE_TIMEOUT_SECONDS > 0 and self.auth is not None and not self.closed:
            self._schedule("idle", settings.WS_IDLE_TIMEOUT_SECONDS, self._idle)

    async def _idle(self) -> None:
        if self.closed:
            return
        if self.turn_task is not None:
            self._touch()
            return
        await self._send(error_event(PlatformError(
            f"No frame for {settings.WS_IDLE_TIMEOUT_SECONDS:g} s: the connection is closed; reconnect to go on.",
            code="idle_timeout", http_status=408)))
        await self._close(CLOSE_IDLE, "idle_timeout")


class NoRouteConsumer(AsyncWebsocketConsumer):
    """Any other WebSocket path: accepted only to say so with a close code (4404), instead of the
    router raising (a server traceback) for a client's typo."""

    async def connect(self) -> None:
        await self.accept()
        error = NotFound(f"No WebSocket endpoint at {self.scope.get('path', '')[:200]!r}: "
                         "use /ws/agents/<name>/chat/.", code="route_not_found")
        await self.send(text_data=_DUMPS(error_event(error)))
        await self.close(code=CLOSE_NOT_FOUND)

    async def receive(self, text_data=None, bytes_data=None) -> None:
        return

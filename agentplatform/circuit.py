"""Circuit breakers, one per name (the runtime names them "provider/model"), shared by every
worker.

    closed ──(CIRCUIT_FAILURE_THRESHOLD failures in a row, the first at most
              CIRCUIT_WINDOW_SECONDS ago)──▶ open
    open ──(CIRCUIT_COOLDOWN_SECONDS later, the next call)──▶ half_open: that one call probes
    half_open ──(the probe succeeds)──▶ closed      (the probe fails)──▶ open again

`circuit_acquire` asks before every call: a closed circuit lets it through, an open one refuses
it at once (with the seconds until a probe is allowed), and once the cool-down is over exactly
one caller — across all workers — gets to probe; the others are refused until the probe
reports or its lease (what the caller says it may take, at most the cool-down) runs out, so a
probe whose worker died does not keep the circuit half-open forever. `circuit_success` closes
the circuit and clears its count (any success: failures must come in a row to open it, so a
busy model with occasional errors stays closed); `circuit_failure` counts a failure that says
the callee is unhealthy (which failures do is the caller's decision).

Where the state lives: with Redis (agentplatform.cache.redis_url) a hash per circuit, changed
only by Lua scripts that read Redis' own clock (TIME), so the check-and-set of every transition
is atomic across workers and their clocks do not matter; a set lists the circuits that are not
closed, for /health/ready. Without Redis, the same machine in this process under a lock, tied
to the Django cache by an epoch marker (clearing the cache resets it). If Redis fails, the
process' own state takes over while agentplatform.cache's outage detector says it is down
(REDIS_RETRY_SECONDS before Redis is tried again; logged once per outage): breakers then are
per worker, never an error for the request. The happy path costs
one round trip per call (the acquire); a success writes only when there was something to clear.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any

from django.conf import settings
from django.core.cache import caches
from django.core.signals import setting_changed
from django.dispatch import receiver

from .cache import REDIS_ERRORS, async_redis, async_redis_script, redis_outage, redis_url
from .metrics import circuit_seen

logger = logging.getLogger("agentplatform.circuit")

CLOSED, OPEN, HALF_OPEN = "closed", "open", "half_open"
_STATES = {0: CLOSED, 1: OPEN, 2: HALF_OPEN}
# An open circuit nobody calls is forgotten after a day (a model no agent uses any more).
OPEN_TTL_MS = 24 * 3600 * 1000


@dataclass(frozen=True)
class Permit:
    """The answer to `circuit_acquire`. `probe`: this call decides whether a half-open circuit
    closes. `retry_after`: seconds until a call may be tried again, when refused."""

    allowed: bool
    state: str = CLOSED
    failures: int = 0
    retry_after: float = 0.0
    probe: bool = False


ALLOWED = Permit(allowed=True)


@dataclass(frozen=True)
class CircuitState:
    """A circuit as reported: `retry_at` is when an open circuit lets a probe through, or when
    a half-open circuit's probe in flight runs out; None when a call may go now."""

    name: str
    state: str
    failures: int
    retry_at: datetime | None

    def as_dict(self) -> dict:
        return {"state": self.state, "failures": self.failures,
                "retry_at": self.retry_at.isoformat().replace("+00:00", "Z") if self.retry_at else None}


def _config() -> tuple[int, int, int]:
    return (settings.CIRCUIT_FAILURE_THRESHOLD, int(settings.CIRCUIT_WINDOW_SECONDS * 1000),
            int(settings.CIRCUIT_COOLDOWN_SECONDS * 1000))


def _wall(ms_from_now: float) -> datetime:
    return datetime.now(timezone.utc) + timedelta(milliseconds=ms_from_now)


def _reported(name: str, s: int, n: int, until: int, now: int) -> CircuitState:
    """The state a stored circuit is in at `now`: an open circuit past its cool-down reports
    half_open (the next call probes)."""
    if s == 0:
        return CircuitState(name, CLOSED, n, None)
    if now < until:
        return CircuitState(name, _STATES[s], n, _wall(until - now))
    return CircuitState(name, HALF_OPEN, n, None)


# --- Redis: Lua scripts, one per transition --------------------------------------------------

# A hash per circuit: s (0 closed, 1 open, 2 half-open), n (failures in a row), t (ms of the
# first of them), u (open: ms a probe is allowed from; half-open: ms the probe's lease ends).
_NOW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
"""

# KEYS: the circuit. ARGV: lease_ms. Returns {allowed, s, n, u, now, probe}.
ACQUIRE_SCRIPT = _NOW + """
local f = redis.call('HMGET', KEYS[1], 's', 'n', 'u')
local s = tonumber(f[1]) or 0
local n = tonumber(f[2]) or 0
local u = tonumber(f[3]) or 0
if s == 0 then return {1, 0, n, 0, now, 0} end
if now < u then return {0, s, n, u, now, 0} end
-- cooled down (or the probe's lease ran out): this call probes, the others wait for it
local lease = now + tonumber(ARGV[1])
redis.call('HSET', KEYS[1], 's', 2, 'u', lease)
return {1, 2, n, lease, now, 1}
"""

# KEYS: the circuit, the set of circuits not closed. ARGV: threshold, window_ms, cooldown_ms,
# name, ttl_ms. Returns {opened (0/1), n, u, now}.
FAILURE_SCRIPT = _NOW + """
local threshold, window, cooldown = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local f = redis.call('HMGET', KEYS[1], 's', 'n', 't', 'u')
local s = tonumber(f[1]) or 0
local n = (tonumber(f[2]) or 0) + 1
local t0 = tonumber(f[3])
if s == 1 then
  redis.call('HSET', KEYS[1], 'n', n)
  return {1, n, tonumber(f[4]) or 0, now}
end
if s == 0 and (not t0 or now - t0 >= window) then n = 1; t0 = now end
if s == 2 or n >= threshold then
  local u = now + cooldown
  redis.call('HSET', KEYS[1], 's', 1, 'n', n, 't', t0 or now, 'u', u)
  redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[5]))
  redis.call('SADD', KEYS[2], ARGV[4])
  return {1, n, u, now}
end
redis.call('HSET', KEYS[1], 's', 0, 'n', n, 't', t0)
redis.call('PEXPIRE', KEYS[1], window)
return {0, n, 0, now}
"""

# KEYS: the circuit, the set of circuits not closed. ARGV: name.
SUCCESS_SCRIPT = """
redis.call('DEL', KEYS[1])
redis.call('SREM', KEYS[2], ARGV[1])
return 1
"""

# KEYS: circuits. Returns {now, then s, n, u per circuit (-1 for a circuit not stored)}.
PEEK_SCRIPT = _NOW + """
local out = {now}
for i = 1, #KEYS do
  local f = redis.call('HMGET', KEYS[i], 's', 'n', 'u')
  out[#out + 1] = tonumber(f[1]) or -1
  out[#out + 1] = tonumber(f[2]) or 0
  out[#out + 1] = tonumber(f[3]) or 0
end
return out
"""

_SCRIPTS = {"acquire": ACQUIRE_SCRIPT, "failure": FAILURE_SCRIPT, "success": SUCCESS_SCRIPT, "peek": PEEK_SCRIPT}


def _key(name: str) -> str:
    return caches["default"].make_key(f"circuit:{name}")


def _open_set_key() -> str:
    return caches["default"].make_key("circuits:open")


class RedisCircuits:
    def __init__(self, url: str) -> None:
        self.url = url

    def _script(self, name: str) -> Any:
        return async_redis_script(self.url, _SCRIPTS[name])

    async def acquire(self, name: str, lease_ms: int) -> Permit:
        allowed, s, n, until, now, probe = (int(v) for v in await self._script("acquire")(
            keys=[_key(name)], args=[lease_ms]))
        if allowed:
            return Permit(True, _STATES[s], n, probe=bool(probe))
        return Permit(False, _STATES[s], n, retry_after=max(0, until - now) / 1000)

    async def failure(self, name: str) -> bool:
        threshold, window, cooldown = _config()
        opened, *_ = await self._script("failure")(keys=[_key(name), _open_set_key()],
                                              args=[threshold, window, cooldown, name, OPEN_TTL_MS])
        return bool(int(opened))

    async def success(self, name: str) -> None:
        await self._script("success")(keys=[_key(name), _open_set_key()], args=[name])

    async def states(self, names: list[str]) -> list[CircuitState]:
        if not names:
            return []
        raw = [int(v) for v in await self._script("peek")(keys=[_key(n) for n in names])]
        now = raw[0]
        return [_reported(name, max(0, raw[1 + 3 * i]), raw[2 + 3 * i], raw[3 + 3 * i], now)
                for i, name in enumerate(names)]

    async def not_closed(self) -> list[CircuitState]:
        client = async_redis(self.url)
        names = sorted(m.decode() if isinstance(m, bytes) else m for m in await client.smembers(_open_set_key()))
        found = await self.states(names)
        gone = [s.name for s in found if s.state == CLOSED]  # expired or closed meanwhile
        if gone:
            await client.srem(_open_set_key(), *gone)
        return [s for s in found if s.state != CLOSED]


# --- without Redis: the same machine in this process -----------------------------------------


class LocalCircuits:
    """The circuits of this process, under a lock. With `cache` (the embedded default's
    local-memory cache) an epoch marker ties them to it, as governance.ratelimit.CacheWindow
    does: clearing the cache resets them. Without it (the fallback while Redis is down) they
    are simply this process'."""

    EPOCH_KEY = "circuit:epoch"

    def __init__(self, cache: Any = None) -> None:
        self.cache = cache
        self.lock = threading.Lock()
        self.epoch: str | None = None
        self.circuits: dict[str, list[int]] = {}  # name -> [s, n, t, u], ms of time.monotonic

    @staticmethod
    def _now() -> int:
        return int(time.monotonic() * 1000)

    def _check_epoch(self) -> None:
        if self.cache is None:
            return
        epoch = self.cache.get(self.EPOCH_KEY)
        if epoch is None or epoch != self.epoch:
            if epoch is None:
                epoch = uuid.uuid4().hex
                self.cache.set(self.EPOCH_KEY, epoch, None)
            self.epoch = epoch
            self.circuits.clear()

    async def acquire(self, name: str, lease_ms: int) -> Permit:
        now = self._now()
        with self.lock:
            self._check_epoch()
            c = self.circuits.get(name)
            if c is None or c[0] == 0:
                return Permit(True, CLOSED, c[1] if c else 0)
            s, n, _, until = c
            if now < until:
                return Permit(False, _STATES[s], n, retry_after=(until - now) / 1000)
            c[0], c[3] = 2, now + lease_ms
            return Permit(True, HALF_OPEN, n, probe=True)

    async def failure(self, name: str) -> bool:
        threshold, window, cooldown = _config()
        now = self._now()
        with self.lock:
            self._check_epoch()
            c = self.circuits.setdefault(name, [0, 0, now, 0])
            c[1] += 1
            if c[0] == 1:
                return True
            if c[0] == 0 and now - c[2] >= window:
                c[1], c[2] = 1, now
            if c[0] == 2 or c[1] >= threshold:
                c[0], c[3] = 1, now + cooldown
                return True
            return False

    async def success(self, name: str) -> None:
        with self.lock:
            self._check_epoch()
            self.circuits.pop(name, None)

    async def states(self, names: list[str]) -> list[CircuitState]:
        now = self._now()
        with self.lock:
            self._check_epoch()
            out = []
            for name in names:
                s, n, _, until = self.circuits.get(name) or (0, 0, 0, 0)
                if s == 0 and n and now - self.circuits[name][2] >= settings.CIRCUIT_WINDOW_SECONDS * 1000:
                    n = 0  # the count's window is over
                out.append(_reported(name, s, n, until, now))
            return out

    async def not_closed(self) -> list[CircuitState]:
        with self.lock:
            names = sorted(n for n, c in self.circuits.items() if c[0] != 0)
        return [s for s in await self.states(names) if s.state != CLOSED]


# --- choosing the store, falling back when Redis fails ---------------------------------------

_store: RedisCircuits | LocalCircuits | None = None
_fallback = LocalCircuits()


def _primary() -> RedisCircuits | LocalCircuits:
    global _store
    if _store is None:
        url = redis_url()
        _store = RedisCircuits(url) if url else LocalCircuits(caches["default"])
    return _store


async def _call(method: str, *args: Any) -> Any:
    """`method` on the shared store; on the process' own state while Redis is down
    (agentplatform.cache's outage detector)."""
    store = _primary()
    if isinstance(store, RedisCircuits):
        outage = redis_outage(store.url)
        if not outage.is_down():
            try:
                result = await getattr(store, method)(*args)
            except REDIS_ERRORS as exc:
                outage.failed("circuit", exc)
            else:
                outage.ok()
                return result
        store = _fallback
    return await getattr(store, method)(*args)


def _enabled() -> bool:
    return settings.CIRCUIT_FAILURE_THRESHOLD > 0


async def circuit_acquire(name: str, *, lease_seconds: float) -> Permit:
    """May a call to `name` go now? `lease_seconds`: how long this call may take, should it be
    the probe (capped at the cool-down)."""
    if not _enabled():
        return ALLOWED
    lease = max(1, int(min(lease_seconds, settings.CIRCUIT_COOLDOWN_SECONDS) * 1000))
    permit = await _call("acquire", name, lease)
    circuit_seen(name, permit.state)
    return permit


async def circuit_success(name: str, permit: Permit) -> None:
    """A call let through by `permit` succeeded."""
    if _enabled() and (permit.state != CLOSED or permit.failures):
        await _call("success", name)
        circuit_seen(name, CLOSED)


async def circuit_failure(name: str) -> bool:
    """A call failed in a way that says `name` is unhealthy; True when its circuit is open now."""
    if not _enabled():
        return False
    opened = await _call("failure", name)
    if opened:
        circuit_seen(name, OPEN)
    return opened


async def circuit_states(names: list[str]) -> list[CircuitState]:
    """The circuits of `names`, in order (closed for names never failed)."""
    return await _call("states", list(names))


async def open_circuits() -> list[CircuitState]:
    """Every circuit that is not closed (open, or half-open), by name."""
    return await _call("not_closed")


@receiver(setting_changed)
def _reset(*, setting: str, **kwargs) -> None:
    global _store
    if setting in ("REDIS_URL", "CACHES"):
        _store = None

"""Sliding-window rate limits: per API key on requests and tokens per minute, per agent on
requests per minute (across all keys).

Algorithm: a sliding *log* (not a fixed window, not the two-bucket approximation). Each limit
is a sorted set whose scores are the millisecond times entries were counted; an entry counts
while `now - WINDOW_MS < score`. A request is admitted when every limit that applies has room;
then, and only then, it is added to each request log, so a refused request costs nothing
against the window. The log is exact (the two-bucket counter assumes requests spread evenly
over the previous window and can be off by up to that bucket's share), at the price of one
entry per counted request: at most `limit` entries per key, i.e. small for per-minute limits.

* Requests: members are the turn's run id; the count is ZCARD after dropping expired entries.
* Tokens: known only after the run. `after(turn)` adds `<run id>:<total_tokens>` at the time
  the run finished, and to a running sum kept next to the log (entries leaving the window are
  subtracted as they are pruned, so a check does not walk the window); `before` refuses when
  the window's sum already reaches the limit.
  A request admitted just under the limit may overshoot it by its own tokens (they cannot
  be known in advance); the next ones wait until enough of the window has slid by.

Atomicity: with Redis (settings.REDIS_URL, or a django-redis default cache) one Lua script
checks and counts every limit of a request in one step, so any number of workers together
admit the configured number, not a multiple of it; the script takes Redis' own clock (TIME),
so the workers' clocks do not matter. It runs through redis.asyncio, one client per event
loop, and never blocks the loop. Without Redis the same logs live in the process under a
lock (CacheWindow, tied to the Django cache by an epoch marker so clearing the cache clears
them): exact for the embedded default (one process), not shared between processes.

If Redis fails (agentplatform.cache's outage detector: skipped at once while it is down), the
request is let through unchecked (RATE_LIMIT_FAIL_MODE=open, the default: a broken limiter must
not take the platform down with it) or refused with 503 `rate_limiter_unavailable` (closed);
either way logged and counted (rate_limit_unchecked_total{mode}). A turn admitted here but refused by a later stage (budget, guard) is
taken out of the request logs again (`refused`). Keys and agents without limits (empty or 0)
cost nothing: no Redis call at all. Replays of idempotent requests do not reach the pipeline and are not
counted.

Headers: on success `X-RateLimit-Limit`, `-Remaining` and `-Reset` describe the tighter
request limit (the key's or the agent's, whichever has fewer requests left); with a token
limit `X-RateLimit-Limit-Tokens`, `-Remaining-Tokens` and `-Reset-Tokens` are added (and the
plain ones describe tokens when there is no request limit). `Reset` is the number of seconds,
rounded up, until the oldest counted entry leaves the window, i.e. until `Remaining` grows.
Over a limit: 429 `rate_limit_error`/`rate_limited` with `Retry-After` (seconds until that
limit admits a request again) and the X-RateLimit-* headers of the limit that refused.
"""

from __future__ import annotations

import logging
import math
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass
from typing import Any

from django.conf import settings
from django.core.cache import caches
from django.core.signals import setting_changed
from django.dispatch import receiver

from agentplatform.cache import REDIS_ERRORS, async_redis, async_redis_script, redis_outage, redis_url
from agentplatform.errors import PlatformError, ServiceUnavailable
from agentplatform.metrics import rate_limit_unchecked

logger = logging.getLogger("governance.ratelimit")

# Limits are per minute; the window is not a knob.
WINDOW_MS = 60_000

REQUESTS = "r"
TOKENS = "t"


class RateLimited(PlatformError):
    http_status = 429
    code = "rate_limited"
    type = "rate_limit_error"
    message = "Rate limit reached."
    permanent = False


@dataclass(frozen=True)
class Limit:
    """One sliding window: `scope` is "key" or "agent", `kind` REQUESTS or TOKENS."""

    scope: str
    kind: str
    owner: str  # key prefix or agent name, for messages
    key: str    # storage key
    limit: int

    @property
    def sum_key(self) -> str:
        return f"{self.key}:sum"

    @property
    def unit(self) -> str:
        return "requests" if self.kind == REQUESTS else "tokens"


@dataclass(frozen=True)
class LimitState:
    limit: Limit
    used: int      # counted in the window (this request included when admitted)
    wait_ms: int   # until this limit admits a request again; 0 when it admits
    reset_ms: int  # until the oldest counted entry leaves the window; 0 when none is counted

    @property
    def remaining(self) -> int:
        return max(0, self.limit.limit - self.used)


@dataclass(frozen=True)
class Decision:
    allowed: bool
    states: tuple[LimitState, ...]

    def refusing(self) -> LimitState:
        """The limit that refused (the longest wait when several did)."""
        return max((s for s in self.states if s.wait_ms > 0), key=lambda s: s.wait_ms)

    def headers(self) -> dict[str, str]:
        requests = [s for s in self.states if s.limit.kind == REQUESTS]
        tokens = [s for s in self.states if s.limit.kind == TOKENS]
        if not self.allowed:
            state = self.refusing()
            out = _headers(state, "")
            out["Retry-After"] = str(_seconds(state.wait_ms))
        else:
            # The tighter request limit (fewer left); the key's on a tie.
            main = min(requests, key=lambda s: s.remaining) if requests else (tokens[0] if tokens else None)
            out = _headers(main, "") if main else {}
        if tokens:
            out.update(_headers(tokens[0], "-Tokens"))
        return out


def _seconds(ms: int) -> int:
    return max(0, math.ceil(ms / 1000))


def _headers(state: LimitState, suffix: str) -> dict[str, str]:
    return {f"X-RateLimit-Limit{suffix}": str(state.limit.limit),
            f"X-RateLimit-Remaining{suffix}": str(state.remaining),
            f"X-RateLimit-Reset{suffix}": str(_seconds(state.reset_ms))}


def _storage_key(name: str) -> str:
    # The cache's key format (KEY_PREFIX:version:key, as django-redis writes it).
    return caches["default"].make_key(f"rl:{name}")


def limits_for(principal: Any, agent: Any) -> list[Limit]:
    """The limits that apply to a turn of `principal` (an API key, or None) on `agent`."""
    limits = []
    if principal is not None:
        if principal.rate_limit_rpm:
            limits.append(Limit("key", REQUESTS, principal.prefix, _storage_key(f"key:{principal.key_id}:r"),
                                principal.rate_limit_rpm))
        if principal.rate_limit_tpm:
            limits.append(Limit("key", TOKENS, principal.prefix, _storage_key(f"key:{principal.key_id}:t"),
                                principal.rate_limit_tpm))
    if agent is not None and getattr(agent, "rate_limit_rpm", None):
        limits.append(Limit("agent", REQUESTS, agent.name, _storage_key(f"agent:{agent.id}:r"), agent.rate_limit_rpm))
    return limits


# --- Redis: one Lua script per decision -----------------------------------------------------

# KEYS: per limit its sorted set (score = ms time an entry was counted; member = run id in a
# request log, "<run id>:<tokens>" in a token log), and for a token log next its running sum
# (a string), so that a check costs O(log n + expired entries), not a pass over the window.
# ARGV: now_ms ("" = Redis' clock), window_ms, member, then kind ("r"/"t") and limit per limit.
# Returns {allowed, now, then per limit: used, wait_ms, oldest_ms (-1 when empty)}.
HIT_SCRIPT = """
local now = tonumber(ARGV[1])
if not now then
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local window = tonumber(ARGV[2])
local member = ARGV[3]
local out = {1, now}
local k = 1
local requests = {}
local n = (#ARGV - 3) / 2
for i = 1, n do
  local kind = ARGV[2 + 2 * i]
  local limit = tonumber(ARGV[3 + 2 * i])
  local key = KEYS[k]
  local used, wait = 0, 0
  if kind == 'r' then
    k = k + 1
    redis.call('ZREMRANGEBYSCORE', key, '-inf', now - window)
    used = redis.call('ZCARD', key)
    if used >= limit then
      -- admissible again once the (used - limit + 1) oldest entries have left the window
      local e = redis.call('ZRANGE', key, used - limit, used - limit, 'WITHSCORES')
      wait = tonumber(e[2]) + window - now
    end
    requests[#requests + 1] = {key, 4 + 3 * (i - 1)}
  else
    local sum = KEYS[k + 1]
    k = k + 2
    local expired = redis.call('ZRANGEBYSCORE', key, '-inf', now - window)
    if #expired > 0 then
      local gone = 0
      for j = 1, #expired do gone = gone + tonumber(string.match(expired[j], ':(%d+)$')) end
      redis.call('ZREMRANGEBYSCORE', key, '-inf', now - window)
      redis.call('DECRBY', sum, gone)
    end
    used = tonumber(redis.call('GET', sum) or '0')
    if used >= limit then
      -- only when refusing: walk the log until enough tokens have left the window
      local e = redis.call('ZRANGE', key, 0, -1, 'WITHSCORES')
      local left = used
      for j = 1, #e, 2 do
        left = left - tonumber(string.match(e[j], ':(%d+)$'))
        if left < limit then wait = tonumber(e[j + 1]) + window - now; break end
      end
    end
  end
  if used >= limit then out[1] = 0 end
  local first = redis.call('ZRANGE', key, 0, 0, 'WITHSCORES')
  local oldest = -1
  if #first > 0 then oldest = tonumber(first[2]) end
  out[#out + 1] = used
  out[#out + 1] = wait
  out[#out + 1] = oldest
end
if out[1] == 1 then
  for _, r in ipairs(requests) do
    redis.call('ZADD', r[1], now, member)
    redis.call('PEXPIRE', r[1], window)
    local at = r[2]
    out[at - 1] = out[at - 1] + 1
    if out[at + 1] == -1 then out[at + 1] = now end
  end
end
return out
"""

# KEYS: a token log and its running sum; ARGV: now_ms ("" = Redis' clock), window_ms,
# member "<run id>:<tokens>", tokens.
ADD_SCRIPT = """
local now = tonumber(ARGV[1])
if not now then
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local window = tonumber(ARGV[2])
-- no pruning here: only HIT_SCRIPT prunes, keeping the sum in step with the log
if redis.call('ZADD', KEYS[1], now, ARGV[3]) == 1 then
  redis.call('INCRBY', KEYS[2], tonumber(ARGV[4]))
end
redis.call('PEXPIRE', KEYS[1], window)
redis.call('PEXPIRE', KEYS[2], window)
return now
"""

def _decide(limits: list[Limit], now: int, raw: list[int]) -> Decision:
    allowed = bool(raw[0])
    states = []
    for i, limit in enumerate(limits):
        used, wait, oldest = (int(v) for v in raw[2 + 3 * i: 5 + 3 * i])
        reset = max(0, oldest + WINDOW_MS - now) if oldest >= 0 else 0
        states.append(LimitState(limit=limit, used=used, wait_ms=max(wait, 1) if used >= limit.limit else 0,
                                 reset_ms=reset))
    return Decision(allowed=allowed, states=tuple(states))


class RedisWindow:
    """The sliding logs in Redis, checked and counted by one Lua script per request."""

    def __init__(self, url: str) -> None:
        self.url = url

    async def hit(self, limits: list[Limit], *, member: str, now_ms: int | None = None) -> Decision:
        script = async_redis_script(self.url, HIT_SCRIPT)
        args: list[Any] = ["" if now_ms is None else now_ms, WINDOW_MS, member]
        for limit in limits:
            args += [limit.kind, limit.limit]
        keys = []
        for limit in limits:
            keys += [limit.key] if limit.kind == REQUESTS else [limit.key, limit.sum_key]
        raw = await script(keys=keys, args=args)
        return _decide(limits, int(raw[1]), raw)

    async def release(self, limits: list[Limit], *, member: str) -> None:
        async with async_redis(self.url).pipeline(transaction=False) as pipe:
            for limit in limits:
                if limit.kind == REQUESTS:
                    pipe.zrem(limit.key, member)
            await pipe.execute()

    async def add_tokens(self, limit: Limit, *, member: str, tokens: int, now_ms: int | None = None) -> None:
        await async_redis_script(self.url, ADD_SCRIPT)(keys=[limit.key, limit.sum_key],
                     args=["" if now_ms is None else now_ms, WINDOW_MS, f"{member}:{tokens}", tokens])


# --- without Redis: the same logs in this process ----------------------------------------


class _Log:
    __slots__ = ("entries", "total")

    def __init__(self) -> None:
        self.entries: deque[tuple[int, str, int]] = deque()  # (score_ms, member, tokens), by score
        self.total = 0  # tokens in `entries`

    def prune(self, now: int) -> None:
        while self.entries and self.entries[0][0] <= now - WINDOW_MS:
            self.total -= self.entries.popleft()[2]

    def add(self, score: int, member: str, tokens: int) -> None:
        if self.entries and self.entries[-1][0] > score:  # rare: keep the log ordered
            position = next(i for i, e in enumerate(self.entries) if e[0] > score)
            self.entries.insert(position, (score, member, tokens))
        else:
            self.entries.append((score, member, tokens))
        self.total += tokens


class CacheWindow:
    """The sliding logs in this process, under a lock: exact within one process, which is what
    the embedded default (local-memory cache) is. The logs are deques kept in memory, not
    values pickled through the cache on every request (that costs O(window) per check); an
    epoch marker in the Django cache ties them to it, so clearing the cache (tests, an
    operator) clears them too. Not shared between processes: use Redis for several workers."""

    EPOCH_KEY = "rl:epoch"

    def __init__(self, cache: Any = None) -> None:
        self.cache = cache if cache is not None else caches["default"]
        self.lock = threading.Lock()
        self.epoch: str | None = None
        self.logs: dict[str, _Log] = {}

    def _get(self, key: str, now: int) -> _Log:
        log = self.logs.get(key)
        if log is None:
            log = self.logs[key] = _Log()
        log.prune(now)
        return log

    def _check_epoch(self) -> None:
        epoch = self.cache.get(self.EPOCH_KEY)
        if epoch is None or epoch != self.epoch:
            if epoch is None:
                epoch = uuid.uuid4().hex
                self.cache.set(self.EPOCH_KEY, epoch, None)
            self.epoch = epoch
            self.logs.clear()
        elif len(self.logs) > 10_000:  # forget idle logs now and then
            self.logs = {k: v for k, v in self.logs.items() if v.entries}

    async def hit(self, limits: list[Limit], *, member: str, now_ms: int | None = None) -> Decision:
        return self.hit_sync(limits, member=member, now_ms=now_ms)

    def hit_sync(self, limits: list[Limit], *, member: str, now_ms: int | None = None) -> Decision:
        now = int(time.time() * 1000) if now_ms is None else now_ms
        raw: list[int] = [1, now]
        with self.lock:
            self._check_epoch()
            logs = []
            for limit in limits:
                log = self._get(limit.key, now)
                logs.append(log)
                wait = 0
                if limit.kind == REQUESTS:
                    used = len(log.entries)
                    if used >= limit.limit:
                        wait = log.entries[used - limit.limit][0] + WINDOW_MS - now
                else:
                    used = log.total
                    if used >= limit.limit:
                        left = used
                        for score, _, tokens in log.entries:
                            left -= tokens
                            if left < limit.limit:
                                wait = score + WINDOW_MS - now
                                break
                if used >= limit.limit:
                    raw[0] = 0
                raw += [used, wait, log.entries[0][0] if log.entries else -1]
            if raw[0]:
                for i, (limit, log) in enumerate(zip(limits, logs)):
                    if limit.kind == REQUESTS:
                        log.add(now, member, 0)
                        at = 2 + 3 * i
                        raw[at] += 1
                        if raw[at + 2] == -1:
                            raw[at + 2] = now
        return _decide(limits, now, raw)

    async def release(self, limits: list[Limit], *, member: str) -> None:
        with self.lock:
            for limit in limits:
                log = self.logs.get(limit.key)
                if limit.kind == REQUESTS and log is not None:
                    for entry in log.entries:
                        if entry[1] == member:
                            log.entries.remove(entry)
                            break

    async def add_tokens(self, limit: Limit, *, member: str, tokens: int, now_ms: int | None = None) -> None:
        now = int(time.time() * 1000) if now_ms is None else now_ms
        with self.lock:
            self._check_epoch()
            self._get(limit.key, now).add(now, member, tokens)


_backend_cache: RedisWindow | CacheWindow | None = None


def rate_limit_backend() -> RedisWindow | CacheWindow:
    global _backend_cache
    if _backend_cache is None:
        url = redis_url()
        _backend_cache = RedisWindow(url) if url else CacheWindow()
    return _backend_cache


@receiver(setting_changed)
def _reset(*, setting: str, **kwargs) -> None:
    global _backend_cache
    if setting in ("REDIS_URL", "CACHES"):
        _backend_cache = None


def _error(decision: Decision) -> RateLimited:
    state = decision.refusing()
    limit = state.limit
    retry = max(1, _seconds(state.wait_ms))
    whose = "this API key" if limit.scope == "key" else f"agent {limit.owner!r}"
    return RateLimited(
        f"Rate limit reached: {limit.limit} {limit.unit} per minute for {whose}. Retry in {retry} s.",
        headers={**decision.headers(), "Retry-After": str(retry)},
        details={"scope": limit.scope, "limit": limit.unit, "limit_per_minute": limit.limit,
                 "used": state.used, "retry_after_seconds": retry})


class RateLimiterUnavailable(ServiceUnavailable):
    code = "rate_limiter_unavailable"
    message = "Rate limits cannot be checked right now (RATE_LIMIT_FAIL_MODE=closed); retry shortly."


async def _redis_call(call, *args, **kwargs) -> Any:
    """`call` on the shared backend, through the Redis outage detector: raises _Skipped while
    Redis is down or when this call fails (reported)."""
    backend = rate_limit_backend()
    if not isinstance(backend, RedisWindow):
        return await getattr(backend, call)(*args, **kwargs)
    outage = redis_outage(backend.url)
    if outage.is_down():
        raise _Skipped
    try:
        result = await getattr(backend, call)(*args, **kwargs)
    except REDIS_ERRORS as exc:
        outage.failed("rate_limit", exc)
        raise _Skipped from exc
    outage.ok()
    return result


class _Skipped(Exception):
    """The rate limiter's Redis is unavailable."""


class RateLimitStage:
    """Pipeline stage (agents.pipeline): refuses over-limit turns, counts tokens afterwards."""

    NOTE = "ratelimit"

    async def before(self, turn) -> None:
        limits = limits_for(turn.principal, turn.agent)
        if not limits:
            return
        try:
            decision = await _redis_call("hit", limits, member=turn.run_id.hex)
        except _Skipped:
            mode = settings.RATE_LIMIT_FAIL_MODE
            rate_limit_unchecked(mode)
            logger.info("Rate limits of run %s unchecked (Redis unavailable; RATE_LIMIT_FAIL_MODE=%s)",
                        turn.run_id, mode)
            if mode == "closed":
                raise RateLimiterUnavailable(headers={"Retry-After": str(max(1, math.ceil(
                    settings.REDIS_RETRY_SECONDS)))}) from None
            return
        if not decision.allowed:
            raise _error(decision)
        turn.notes[self.NOTE] = limits
        turn.response_headers.update(decision.headers())

    async def refused(self, turn, error: PlatformError) -> None:
        # A later stage refused a turn counted here: it did not happen, take it out again.
        limits = turn.notes.pop(self.NOTE, None)
        if not limits:
            return
        try:
            await _redis_call("release", limits, member=turn.run_id.hex)
        except _Skipped:
            logger.info("Could not release run %s from the rate limits (Redis unavailable)", turn.run_id)

    async def after(self, turn) -> None:
        limits = turn.notes.get(self.NOTE) or ()
        tokens = turn.run.usage.total_tokens if turn.run is not None else 0
        for limit in limits:
            if limit.kind == TOKENS and tokens > 0:
                try:
                    await _redis_call("add_tokens", limit, member=turn.run_id.hex, tokens=tokens)
                except _Skipped:
                    logger.info("Could not count the tokens of run %s (Redis unavailable)", turn.run_id)

"""What the runtime does when a model call fails: retry it, skip a model whose circuit is open,
and keep every run inside its one deadline.

Retries. A failed call is retried on the same model when its error is transient — the upstream
answered 408, 409, 429 or 5xx, timed out (including the first-token and idle limits of a
stream), could not be reached, or sent a body that is not a chat completion — at most
`max_retries` times (the agent's, else LLM_MAX_RETRIES), then the next fallback model is tried
(with its own retries). Every other 4xx is the request's fault and fails the same way again: it
is never retried (a fallback may still take it). The wait before retry k (0-based) is "full
jitter" exponential backoff, uniform in [0, min(LLM_RETRY_MAX_WAIT_SECONDS, base * 2**k)]
(base: LLM_RETRY_BASE_SECONDS), so that workers hit by the same outage do not come back
together. When the upstream said how long to wait (`Retry-After`, seconds or an HTTP date, or
`retry-after-ms`) it is waited at least that long (plus up to `base` of jitter); a wait longer
than LLM_RETRY_MAX_WAIT_SECONDS, or one that would not leave time for the call before the
deadline, is not waited: the next model is tried, or the caller gets the error with the
upstream's Retry-After. A stream is retried only while nothing of it reached the client.

Circuit breakers (agentplatform.circuit) are per "provider/model". The failures that say the
model is unhealthy count: 5xx, 408, 429, timeouts, connection errors, unreadable responses.
429 counts because a rate-limited model will refuse the next callers too, and an open circuit
spares them the round trip (they go to the fallback at once); 4xx caused by the request, and
configuration errors (no key, unknown provider), never count; a 4xx answer even shows the model
is up, and resets the count (or closes a half-open circuit) as a success does. A call cut short
by the run's deadline counts as a timeout. An open circuit is skipped without a call (and without a call
record); when it was the last model, the run fails with 503 `circuit_open` and `Retry-After`
set to when the circuit lets a probe through.

The deadline. The agent's `timeout_seconds` bounds the whole run from its start: every
attempt, retry wait, fallback, tool step and a stream's whole duration. A stream must also
send its first token within LLM_FIRST_TOKEN_TIMEOUT_SECONDS and never go silent longer than
LLM_STREAM_IDLE_TIMEOUT_SECONDS (0: no limit) — those are upstream timeouts, retried or fallen
back from like any other. Running out of the deadline ends the run with 504 `timeout`.
"""

from __future__ import annotations

import math
import random
import time

from django.conf import settings

from agentplatform.errors import PlatformError

from .providers.base import ProviderError

# Misconfiguration: no call was made, and none will succeed until an operator acts.
_CONFIG_CODES = frozenset({"unknown_provider", "provider_not_configured"})


class RunTimeout(PlatformError):
    http_status = 504
    code = "timeout"
    type = "server_error"
    message = "The agent did not finish in time."
    permanent = False


class CircuitOpen(ProviderError):
    """Every model left to try has its circuit open: 503 with Retry-After."""

    http_status = 503
    code = "circuit_open"
    message = "The model is failing and is not called for now."


def circuit_open_error(model: str, retry_after: float) -> CircuitOpen:
    seconds = max(1, math.ceil(retry_after))
    return CircuitOpen(f"{model} failed repeatedly and is not called for now; retry in {seconds} s.",
                       retry_after=float(seconds), headers={"Retry-After": str(seconds)},
                       details={"model": model, "retry_after_seconds": seconds})


class Deadline:
    """The time a run has left, on the monotonic clock."""

    __slots__ = ("seconds", "ends")

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.ends = time.monotonic() + seconds

    def remaining(self) -> float:
        return self.ends - time.monotonic()

    @property
    def expired(self) -> bool:
        return self.remaining() <= 0

    def error(self) -> RunTimeout:
        return RunTimeout(f"The agent did not finish within its {self.seconds:g} s timeout.")


def is_retryable(err: ProviderError) -> bool:
    """Could the same call to the same model succeed if made again?"""
    if err.permanent or err.code in _CONFIG_CODES or isinstance(err, CircuitOpen):
        return False
    status = err.upstream_status
    if status is not None:
        return status in (408, 409, 429) or status >= 500
    return True  # timeouts, connection errors, broken responses


def counts_against_circuit(err: ProviderError) -> bool:
    """Does this failure say the model is unhealthy (see the module docstring)?"""
    if err.code in _CONFIG_CODES or isinstance(err, CircuitOpen):
        return False
    status = err.upstream_status
    if status is not None:
        return status in (408, 429) or status >= 500
    return not err.permanent


def max_retries(agent) -> int:
    value = getattr(agent, "max_retries", None)
    return settings.LLM_MAX_RETRIES if value is None else value


def retry_delay(err: ProviderError, retry: int, remaining: float) -> float | None:
    """Seconds to wait before retry number `retry` (0-based) of a failed call, or None when it
    should not be retried on this model (see the module docstring)."""
    if not is_retryable(err):
        return None
    base, cap = settings.LLM_RETRY_BASE_SECONDS, settings.LLM_RETRY_MAX_WAIT_SECONDS
    if err.retry_after is not None:
        if err.retry_after > cap:
            return None
        delay = err.retry_after + random.uniform(0, base)
    else:
        delay = random.uniform(0, min(cap, base * 2 ** retry))
    # A wait that leaves no time for the call itself is not worth making.
    return delay if delay < remaining else None

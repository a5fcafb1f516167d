"""Outgoing webhooks, one way for every kind (budget alerts, async-run callbacks): the body's
encoding, its signature, what a response means, and the backoff between attempts.

    body = webhook_body(payload)                       # compact JSON, sorted keys
    headers["X-AgentPlatform-Signature"] = webhook_signature(body, secret)
    webhook_outcome(status, text)                      # raises DeliveryFailed unless 2xx
    retry_countdown(attempts, base=...)                # seconds before the next attempt

The signature is `sha256=<hex HMAC-SHA256 of the raw body with the secret>`; receivers verify it
over the bytes they received, before parsing. Any 2xx is success; redirects are never followed
(a 3xx is a failure). A 4xx other than 408, 425 and 429 is permanent: the receiver refuses this
request and would refuse it again, so it is not retried. Everything else (5xx, 408, 425, 429,
a connection error, a timeout) is retried with exponential backoff.
"""

from __future__ import annotations

import hashlib
import hmac
import json

SIGNATURE_HEADER = "X-AgentPlatform-Signature"
EVENT_HEADER = "X-AgentPlatform-Event"
DELIVERY_HEADER = "X-AgentPlatform-Delivery"
MAX_BACKOFF_SECONDS = 3600.0
_RETRYABLE_4XX = (408, 425, 429)


class DeliveryFailed(Exception):
    """One attempt failed; `permanent`: retrying cannot help."""

    def __init__(self, message: str, *, permanent: bool = False) -> None:
        super().__init__(message)
        self.permanent = permanent


def webhook_body(payload: dict) -> bytes:
    return json.dumps(payload, separators=(",", ":"), sort_keys=True).encode()


def webhook_signature(body: bytes, secret: str) -> str:
    """The X-AgentPlatform-Signature header value of `body`."""
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def webhook_outcome(status: int, text: str) -> None:
    """Raise DeliveryFailed for a response that is not a 2xx (permanent for a refusing 4xx)."""
    if 200 <= status < 300:
        return
    permanent = 400 <= status < 500 and status not in _RETRYABLE_4XX
    raise DeliveryFailed(f"HTTP {status}: {text[:200]}", permanent=permanent)


def retry_countdown(attempts: int, *, base: float, cap: float = MAX_BACKOFF_SECONDS) -> float:
    """Seconds before the next attempt after `attempts` failed ones: base × 2^(attempts-1), at most `cap`."""
    return min(base * 2 ** max(attempts - 1, 0), cap)

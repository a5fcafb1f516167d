"""Sticky assignment of a caller to a variant.

    bucket = int(sha256(f"experiment:{experiment_id}:{unit}").hexdigest()[:15], 16) % 10_000

`unit` is the conversation's session id when the turn has one (REST, SSE, WebSocket, async
runs), else the API key's prefix (the stateless OpenAI-compatible endpoint), else the staff
user's id: a conversation keeps its variant for as long as the weights do not move past its
bucket. The experiment's id is in the hash, so two experiments split independently. Variants
own consecutive ranges of the 10,000 buckets in their order (control first), each
weight × 100 wide: the split is exact to 0.01 %, and a canary ramp (the candidate's weight
growing) only ever moves callers from the control to the candidate, never back.
"""

from __future__ import annotations

import hashlib
from typing import Sequence

BUCKETS = 10_000


def bucket_of(experiment_id: int, unit: str, salt: str = "") -> int:
    digest = hashlib.sha256(f"experiment:{experiment_id}:{salt}{unit}".encode()).hexdigest()
    return int(digest[:15], 16) % BUCKETS


def variant_for_bucket(bucket: int, weights: Sequence[tuple[str, int]]) -> str | None:
    """The variant whose range holds `bucket` ((name, weight percent) in order); None when the
    weights sum to less than 100 and the bucket is past them."""
    edge = 0
    for name, weight in weights:
        edge += weight * (BUCKETS // 100)
        if bucket < edge:
            return name
    return None


def assign(experiment_id: int, unit: str, weights: Sequence[tuple[str, int]]) -> str | None:
    return variant_for_bucket(bucket_of(experiment_id, unit), weights)


def in_shadow(experiment_id: int, run_id: str, percent: int) -> bool:
    """Whether a live run is also sent to the shadow variant: per run, not per conversation."""
    return percent > 0 and bucket_of(experiment_id, run_id, salt="shadow:") < percent * (BUCKETS // 100)

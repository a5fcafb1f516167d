"""Server-sent events: framing and heartbeats for any async stream of events."""

from __future__ import annotations

import asyncio
import json
from typing import AsyncIterator

HEARTBEAT = b": heartbeat\n\n"


def sse_event(event: dict) -> bytes:
    """`event: <type>` plus one JSON `data:` line that carries the type too."""
    return b"event: " + event["type"].encode() + b"\ndata: " + json.dumps(event, separators=(",", ":")).encode() + b"\n\n"


async def with_heartbeats(source: AsyncIterator[bytes], interval: float) -> AsyncIterator[bytes]:
    """Yield from `source`, inserting a comment line whenever it is silent for `interval` seconds,
    so proxies and load balancers keep an idle stream open. The pending read is never
    cancelled by a heartbeat; closing this generator closes `source`."""
    iterator = source.__aiter__()
    pending: asyncio.Future | None = None
    try:
        while True:
            if pending is None:
                pending = asyncio.ensure_future(iterator.__anext__())
            done, _ = await asyncio.wait((pending,), timeout=interval)
            if not done:
                yield HEARTBEAT
                continue
            try:
                chunk = pending.result()
            except StopAsyncIteration:
                return
            finally:
                pending = None
            yield chunk
    finally:
        if pending is not None and not pending.done():
            pending.cancel()
            try:
                await pending
            except (asyncio.CancelledError, StopAsyncIteration, Exception):
                pass
        aclose = getattr(iterator, "aclose", None)
        if aclose is not None:
            await aclose()

"""The channel layer, outage-aware: channels-redis whose consumers outlive a Redis outage.

Every Channels consumer receives from the layer next to its WebSocket; with plain channels-redis
a failed receive raises inside the consumer and closes every WebSocket of the worker. Here, while
agentplatform.cache's outage detector says Redis is down (or a call fails, which it then
reports), receiving waits and tries again, and sends and group changes are skipped (logged,
counted as `channel_layer` in redis_unavailable_total): a turn streams on over its own
worker's WebSocket; what needs other workers (closing a revoked key's connections everywhere)
is what an outage takes away, until Redis answers again. Groups joined during an outage are
joined again when it is over (`group_add` is remembered until `group_discard`).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from channels_redis.core import RedisChannelLayer
from django.conf import settings

from .cache import REDIS_ERRORS, redis_outage

logger = logging.getLogger("agentplatform.redis")


class ResilientRedisChannelLayer(RedisChannelLayer):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        host = self.hosts[0]
        # The same detector as the cache's and the rate limiter's when they share the server.
        self.outage = redis_outage(host.get("address") or f"redis://{host.get('host')}:{host.get('port')}")
        self._missed_groups: set[tuple[str, str]] = set()

    async def receive_single(self, channel: str) -> Any:
        while True:
            if self.outage.is_down():
                await asyncio.sleep(settings.REDIS_RETRY_SECONDS)
                continue
            try:
                result = await super().receive_single(channel)
            except REDIS_ERRORS as exc:
                self.outage.failed("channel_layer", exc)
                continue
            self.outage.ok()
            return result

    async def _guarded(self, what: str, call: Any, *args: Any, rejoin: bool = True) -> bool:
        if self.outage.is_down():
            return False
        try:
            await call(*args)
        except REDIS_ERRORS as exc:
            self.outage.failed("channel_layer", exc)
            logger.info("Channel layer %s skipped: Redis unavailable", what)
            return False
        self.outage.ok()
        if rejoin and self._missed_groups:
            await self._rejoin()
        return True

    async def _rejoin(self) -> None:
        missed, self._missed_groups = self._missed_groups, set()
        for group, channel in missed:
            if not await self._guarded("group_add", super().group_add, group, channel, rejoin=False):
                self._missed_groups.add((group, channel))

    async def send(self, channel: str, message: dict) -> None:
        await self._guarded("send", super().send, channel, message)

    async def group_add(self, group: str, channel: str) -> None:
        if not await self._guarded("group_add", super().group_add, group, channel):
            self._missed_groups.add((group, channel))

    async def group_discard(self, group: str, channel: str) -> None:
        self._missed_groups.discard((group, channel))
        await self._guarded("group_discard", super().group_discard, group, channel)

    async def group_send(self, group: str, message: dict) -> None:
        await self._guarded("group_send", super().group_send, group, message)

    async def check(self) -> str:
        """For /health/ready: a PING, reported to the outage detector like any other call."""
        if self.outage.is_down():
            raise ConnectionError(f"Redis {self.outage.status()['detail']}")
        try:
            await self.connection(0).ping()
        except REDIS_ERRORS as exc:
            self.outage.failed("channel_layer", exc)
            raise
        self.outage.ok()
        return type(self).__name__

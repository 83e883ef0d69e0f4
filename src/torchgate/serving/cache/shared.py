"""`SharedTier`: the Redis tier behind every version's cache, so that a row computed on
one replica is a hit on the others. If Redis fails, requests are served without it for a
second at a time and the errors are counted (`failopen`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import redis.asyncio as aioredis

from torchgate.failopen import RETRY_S as SHARED_RETRY_S
from torchgate.failopen import FailOpen
from torchgate.metrics import Metrics

log = logging.getLogger("torchgate.cache")


class SharedTier:
    """The Redis tier: batched reads (MGET) and writes (pipelined SET PX)."""

    def __init__(self, url: str, metrics: Metrics, clock: Callable[[], float]) -> None:
        self.client = aioredis.Redis.from_url(url, socket_connect_timeout=0.25, socket_timeout=0.25)
        self.metrics = metrics
        self.clock = clock
        self._backend = FailOpen(
            metrics.cache_backend_errors,
            log,
            "shared cache failed; serving without it",
            retry_s=SHARED_RETRY_S,
            clock=clock,
        )

    @staticmethod
    def _key(key: bytes) -> str:
        return "torchgate:row:" + key.hex()

    async def get_many(self, keys: list[bytes]) -> list[bytes | None]:
        if not keys or not self._backend.up:
            return [None] * len(keys)
        try:
            return await self.client.mget([self._key(k) for k in keys])
        except Exception as exc:  # any Redis failure: serve without the shared tier
            self._backend.failed(repr(exc))
            return [None] * len(keys)

    async def put_many(self, items: list[tuple[bytes, bytes]], ttl_s: float) -> None:
        if not items or not self._backend.up:
            return
        try:
            async with self.client.pipeline(transaction=False) as pipe:
                for key, blob in items:
                    pipe.set(self._key(key), blob, px=max(1, int(ttl_s * 1000)))
                await pipe.execute()
        except Exception as exc:
            self._backend.failed(repr(exc))

    async def aclose(self) -> None:
        await self.client.aclose()

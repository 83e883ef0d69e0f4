"""`RateLimiter`: rate limits per API key (per client address when auth is off), with
sliding-window counters.

The sliding-window-counter strategy keeps two counters per identity (this window's and
the last one's, weighted by how much of it still overlaps). With `TORCHGATE_REDIS_URL` the
counters live in Redis, through the `limits` library, and every replica enforces one
limit. If Redis fails, requests are still served: the limiter falls back to its
in-process counters for a second at a time, counts the error and logs it.

The in-process counters are written here rather than taken from `limits`' async memory
storage, which takes an asyncio lock and schedules an expiry task on every hit (a cost
on the event loop for every request); these are three numbers per identity in a
size-bounded LRU map, so no number of distinct identities can grow memory without limit
(unknown keys are refused by auth before they get here anyway).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

from cachetools import LRUCache
from limits import RateLimitItem, parse
from limits.aio.storage import RedisStorage
from limits.aio.strategies import SlidingWindowCounterRateLimiter

from torchgate.failopen import FailOpen
from torchgate.metrics import Metrics

log = logging.getLogger("torchgate.ratelimit")


@dataclass(slots=True)
class Decision:
    allowed: bool
    policy: str
    limit: int
    window_s: int
    remaining: int
    reset_s: int

    def header_dict(self) -> dict[str, str]:
        """The IETF draft's structured fields and the older X-less trio clients still read."""
        return {
            "RateLimit-Policy": f'"{self.policy}";q={self.limit};w={self.window_s}',
            "RateLimit": f'"{self.policy}";r={self.remaining};t={self.reset_s}',
            "RateLimit-Limit": str(self.limit),
            "RateLimit-Remaining": str(self.remaining),
            "RateLimit-Reset": str(self.reset_s),
        }

    def headers(self) -> list[tuple[bytes, bytes]]:
        return [(k.lower().encode(), v.encode()) for k, v in self.header_dict().items()]


class LocalCounters:
    """Sliding-window counters in process, for at most `max_identities` identities."""

    def __init__(
        self, *, max_identities: int = 100_000, clock: Callable[[], float] = time.monotonic
    ) -> None:
        # identity -> [window index, hits in that window, hits in the one before]
        self._windows: LRUCache[str, list[int]] = LRUCache(max_identities)
        self.clock = clock

    def __len__(self) -> int:
        return len(self._windows)

    def hit(self, key: str, amount: int, window_s: int, cost: int = 1) -> tuple[bool, int, int]:
        """Count `cost` hits if they fit: (allowed, remaining, seconds until the window turns)."""
        now = self.clock()
        index, into = divmod(now, window_s)
        state = self._windows.get(key)
        if state is None or state[0] < index - 1:
            state = self._windows[key] = [int(index), 0, 0]
        elif state[0] == index - 1:
            state[:] = [int(index), 0, state[1]]
        weighted = state[2] * (1 - into / window_s) + state[1]
        allowed = weighted + cost <= amount
        if allowed:
            state[1] += cost
            weighted += cost
        return allowed, max(0, math.floor(amount - weighted)), max(1, math.ceil(window_s - into))


class RateLimiter:
    """Counts hits per identity against a limit, in Redis when configured."""

    def __init__(
        self,
        default: str,
        *,
        redis_url: str | None,
        metrics: Metrics,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.default = parse(default)
        self.metrics = metrics
        self.clock = clock
        self._items: dict[str, RateLimitItem] = {}
        self._local = LocalCounters(clock=clock)
        self._shared: SlidingWindowCounterRateLimiter | None = None
        self._storage: RedisStorage | None = None
        if redis_url:
            storage = self._storage = RedisStorage(
                "async+" + redis_url,
                implementation="redispy",
                wrap_exceptions=True,
                key_prefix="torchgate-limits",
                socket_connect_timeout=0.25,
                socket_timeout=0.25,
            )
            self._shared = SlidingWindowCounterRateLimiter(storage)
        self._backend = FailOpen(
            metrics.ratelimit_backend_errors,
            log,
            "rate-limit backend failed; using in-process counters",
            clock=clock,
        )

    async def aclose(self) -> None:
        if self._storage is not None:
            await self._storage.bridge.storage.aclose()

    def item(self, spec: str | None) -> tuple[str, RateLimitItem]:
        if spec is None:
            return "default", self.default
        item = self._items.get(spec)
        if item is None:
            item = self._items[spec] = parse(spec)
        return "key", item

    @property
    def shared(self) -> bool:
        """Whether counters are in Redis (so `hit` must be awaited); else `hit_local`."""
        return self._shared is not None

    def hit_local(self, identity: str, spec: str | None = None, cost: int = 1) -> Decision:
        """`hit` with the in-process counters: no await, no lock, O(1)."""
        policy, item = self.item(spec)
        return self._local_decision(identity, policy, item, cost)

    async def hit(self, identity: str, spec: str | None = None, cost: int = 1) -> Decision:
        policy, item = self.item(spec)
        if self._shared is not None and self._backend.up:
            try:
                return await self._shared_decision(self._shared, item, identity, policy, cost)
            except Exception as exc:  # any backend failure: serve on, with local counters
                self._backend.failed(type(exc).__name__)
        return self._local_decision(identity, policy, item, cost)

    def _local_decision(
        self, identity: str, policy: str, item: RateLimitItem, cost: int
    ) -> Decision:
        window = item.get_expiry()
        allowed, remaining, reset_s = self._local.hit(
            f"{identity}/{item.amount}/{window}", item.amount, window, cost
        )
        return Decision(allowed, policy, item.amount, window, remaining, reset_s)

    @staticmethod
    async def _shared_decision(
        limiter: SlidingWindowCounterRateLimiter,
        item: RateLimitItem,
        identity: str,
        policy: str,
        cost: int,
    ) -> Decision:
        allowed = await limiter.hit(item, identity, cost=cost)
        reset_at, remaining = await limiter.get_window_stats(item, identity)
        reset_s = max(1, math.ceil(reset_at - time.time()))
        return Decision(allowed, policy, item.amount, item.get_expiry(), remaining, reset_s)

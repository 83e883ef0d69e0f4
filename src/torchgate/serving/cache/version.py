"""`VersionCache`: the cache of one served version: its in-process tier (a `TTLCache`,
cachetools: TTL plus an LRU size bound), lookups through the shared tier behind it, and
single flight, so that concurrent identical misses are computed once and only the rows
that miss go to the model.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

import numpy as np
from cachetools import TTLCache

from torchgate.errors import ClientDisconnected
from torchgate.metrics import Metrics
from torchgate.serving.cache.codec import Row, decode_row, encode_row
from torchgate.serving.cache.control import CachePolicy
from torchgate.serving.cache.keys import key_prefix, row_keys
from torchgate.serving.cache.shared import SharedTier
from torchgate.serving.model import LoadedModel

Compute = Callable[[list[np.ndarray], int], Awaitable[list[np.ndarray]]]


class _CountingTTLCache(TTLCache):
    """A TTLCache that reports entries evicted to make room (not those that expire)."""

    def __init__(self, maxsize: int, ttl: float, timer: Callable[[], float], on_evict) -> None:
        super().__init__(maxsize, ttl, timer=timer)
        self._on_evict = on_evict

    def popitem(self) -> tuple[Any, Any]:
        item = super().popitem()
        self._on_evict()
        return item


class VersionCache:
    """The cache of one served version: lookups, single flight, and stores."""

    def __init__(
        self,
        model: LoadedModel,
        *,
        ttl_s: float,
        max_entries: int,
        shared: SharedTier | None,
        metrics: Metrics,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.model = model
        self.ttl_s = ttl_s
        self.shared = shared
        self.enabled = ttl_s > 0
        evictions = metrics.cache_evictions.labels(model.name)
        self._local: TTLCache = _CountingTTLCache(max_entries, ttl_s or 1, clock, evictions.inc)
        self._hits = metrics.cache_requests.labels(model.name, "hit")
        self._misses = metrics.cache_requests.labels(model.name, "miss")
        self._inflight: dict[bytes, asyncio.Future[Row]] = {}
        self._key_prefix = key_prefix(model)

    def __len__(self) -> int:
        self._local.expire()
        return len(self._local)

    def clear(self) -> None:
        self._local.clear()

    async def run(
        self,
        inputs: list[np.ndarray],
        rows: int,
        policy: CachePolicy,
        compute: Compute,
        tenant: str = "",
        material: list[bytes] | None = None,
    ) -> tuple[list[np.ndarray], str | None]:
        """The outputs for all rows, computing only those that miss; and HIT/MISS/PARTIAL.
        `tenant` namespaces the entries (a key's own, or "" for the shared ones);
        `material` is what each row was made from, when a preprocessor made it."""
        if not self.enabled or policy is CachePolicy.BYPASS:
            return await compute(inputs, rows), None
        keys = row_keys(self.model, inputs, rows, self._key_prefix, tenant, material)
        found: list[Row | None] = [None] * rows
        joined: dict[int, asyncio.Future[Row]] = {}
        if policy is CachePolicy.USE:
            missing = self._lookup(keys, range(rows), found, joined)
            if missing and self.shared is not None:
                blobs = await self.shared.get_many([keys[i] for i in missing])
                for i, blob in zip(missing, blobs, strict=True):
                    if blob is not None:
                        found[i] = self._local[keys[i]] = decode_row(blob)
                # a row another request began computing while this one awaited Redis is
                # joined, not computed twice
                missed = [i for i in missing if found[i] is None]
                missing = self._lookup(keys, missed, found, joined)
        else:
            missing = list(range(rows))
        hits = rows - len(missing)
        if hits:
            self._hits.inc(hits)
        if missing:
            self._misses.inc(len(missing))
            computed = await self._compute(inputs, rows, keys, missing, compute)
            if len(missing) == rows and not joined:
                return computed, "MISS"
            for j, i in enumerate(missing):
                found[i] = [o[j : j + 1] for o in computed]
        for i, future in joined.items():
            found[i] = await self._join(future, inputs, i, compute)
        if not self.model.config.batched:  # one "row": the whole outputs
            return found[0], "HIT"  # type: ignore[return-value]
        outputs = [
            np.concatenate([found[i][k] for i in range(rows)])  # type: ignore[index]
            for k in range(len(self.model.config.outputs))
        ]
        return outputs, "HIT" if not missing else "PARTIAL"

    def _lookup(
        self,
        keys: list[bytes],
        candidates: Iterable[int],
        found: list[Row | None],
        joined: dict[int, asyncio.Future[Row]],
    ) -> list[int]:
        """Fill `found` from the local tier and `joined` from computations in flight; the
        rows left are the misses."""
        missing = []
        for i in candidates:
            hit = self._local.get(keys[i])
            if hit is not None:
                found[i] = hit
            elif keys[i] in self._inflight:
                joined[i] = self._inflight[keys[i]]
            else:
                missing.append(i)
        return missing

    async def _compute(
        self,
        inputs: list[np.ndarray],
        rows: int,
        keys: list[bytes],
        missing: list[int],
        compute: Compute,
    ) -> list[np.ndarray]:
        loop = asyncio.get_running_loop()
        owned: dict[bytes, asyncio.Future[Row]] = {}
        for i in missing:
            if keys[i] not in self._inflight:
                future: asyncio.Future[Row] = loop.create_future()
                future.add_done_callback(_retrieve)
                owned[keys[i]] = self._inflight[keys[i]] = future
        try:
            subset = inputs if len(missing) == rows else [a[missing] for a in inputs]
            computed = await compute(subset, len(missing))
        except BaseException as exc:
            for key, future in owned.items():
                self._inflight.pop(key, None)
                if not future.done():
                    future.set_exception(
                        exc if isinstance(exc, Exception) else ClientDisconnected()
                    )
            raise
        stored: list[tuple[bytes, bytes]] = []
        batched = self.model.config.batched
        for j, i in enumerate(missing):
            row = [o[j : j + 1].copy() if batched else o.copy() for o in computed]
            key = keys[i]
            self._local[key] = row
            future = owned.pop(key, None)
            if future is not None:
                self._inflight.pop(key, None)
                future.set_result(row)
            if self.shared is not None and (blob := encode_row(row)) is not None:
                stored.append((key, blob))
        if stored:
            assert self.shared is not None
            await self.shared.put_many(stored, self.ttl_s)
        return computed

    async def _join(
        self, future: asyncio.Future[Row], inputs: list[np.ndarray], i: int, compute: Compute
    ) -> Row:
        """Wait for another request's computation of this row; redo it if that client left."""
        try:
            return await asyncio.shield(future)
        except ClientDisconnected:
            if not self.model.config.batched:
                return await compute(inputs, 1)
            return await compute([a[i : i + 1] for a in inputs], 1)


def _retrieve(future: asyncio.Future[Row]) -> None:
    """Mark a shared future's exception as seen: its joiners may all have gone."""
    if not future.cancelled():
        future.exception()

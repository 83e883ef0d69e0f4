"""`InferenceCache`: content-addressed, row-by-row result cache with an optional Redis tier.

A row's key is the SHA-256 of one canonical layout: the model's name, version and file
digest, the tenant (the API key's name when the model's cache is scoped per key, else
empty), then for each input its name, datatype, row shape and raw bytes. (Python's
`hash()` is salted per process, collides, and cannot be shared between replicas.) Each
version has its own in-process `TTLCache` (cachetools: TTL plus an LRU size bound); with
`TORCHGATE_REDIS_URL` a shared Redis tier sits behind it, so a row computed on one
replica is a hit on the others. Only the rows that miss go to the model, and concurrent
identical misses are computed once (single flight). If Redis fails, requests are served
without it for a second at a time and the errors are counted.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import struct
import time
from collections.abc import Awaitable, Callable, Iterable
from enum import Enum
from typing import Any

import numpy as np
import orjson
import redis.asyncio as aioredis
from cachetools import TTLCache

from torchgate.errors import ClientDisconnected
from torchgate.failopen import RETRY_S as SHARED_RETRY_S
from torchgate.failopen import FailOpen
from torchgate.metrics import Metrics
from torchgate.serving.model import LoadedModel

log = logging.getLogger("torchgate.cache")

Row = list[np.ndarray]  # one row's outputs, each with a leading dim of 1
Compute = Callable[[list[np.ndarray], int], Awaitable[list[np.ndarray]]]


class CachePolicy(Enum):
    """What the client's `Cache-Control` allows."""

    USE = "use"  # read and write
    REFRESH = "no-cache"  # skip the lookup, store the fresh result
    BYPASS = "no-store"  # neither read nor write

    @classmethod
    def from_header(cls, value: str | None) -> CachePolicy:
        if not value:
            return cls.USE
        directives = {d.strip().lower() for d in value.split(",")}
        if "no-store" in directives:
            return cls.BYPASS
        if "no-cache" in directives or "max-age=0" in directives:
            return cls.REFRESH
        return cls.USE


class _CountingTTLCache(TTLCache):
    """A TTLCache that reports entries evicted to make room (not those that expire)."""

    def __init__(self, maxsize: int, ttl: float, timer: Callable[[], float], on_evict) -> None:
        super().__init__(maxsize, ttl, timer=timer)
        self._on_evict = on_evict

    def popitem(self) -> tuple[Any, Any]:
        item = super().popitem()
        self._on_evict()
        return item


def key_prefix(model: LoadedModel) -> tuple[Any, list[bytes]]:
    """The hash state after the model part of the layout, and each input's name and datatype
    part: the same for every row of a version, so a cache computes them once."""
    prefix = hashlib.sha256()
    for part in (
        b"torchgate-row-v2",
        model.name.encode(),
        str(model.version).encode(),
        model.sha256.encode(),
    ):
        prefix.update(struct.pack("<I", len(part)) + part)
    specs = [
        struct.pack("<I", len(spec.name))
        + spec.name.encode()
        + spec.datatype.encode().ljust(8, b"\0")
        for spec in model.config.inputs
    ]
    return prefix, specs


def row_keys(
    model: LoadedModel,
    inputs: list[np.ndarray],
    rows: int,
    prefix: tuple[Any, list[bytes]] | None = None,
    tenant: str = "",
    material: list[bytes] | None = None,
) -> list[bytes]:
    """One SHA-256 digest per row over the canonical layout described above; with
    `material` (what a preprocessor made each row from: the encoded image, the exact
    text) that stands in for the inputs."""
    start, specs = prefix or key_prefix(model)
    owner = tenant.encode()
    start = start.copy()
    start.update(struct.pack("<I", len(owner)) + owner)
    if material is not None:
        keys = []
        for data in material:
            h = start.copy()
            h.update(b"raw" + struct.pack("<Q", len(data)) + data)
            keys.append(h.digest())
        return keys
    batched = model.config.batched
    parts: list[tuple[bytes, np.ndarray | None, np.ndarray]] = []
    for spec, array in zip(specs, inputs, strict=True):
        shape = array.shape[1:] if batched else array.shape
        head = spec + struct.pack(f"<I{len(shape)}q", len(shape), *shape)
        if array.dtype.kind == "O":  # BYTES: per row, below
            parts.append((head, None, array))
            continue
        contiguous = np.ascontiguousarray(array)
        row_bytes = contiguous.itemsize * (contiguous.size // rows if batched else contiguous.size)
        parts.append((head + struct.pack("<Q", row_bytes), contiguous, array))
    keys = []
    for i in range(rows):
        h = start.copy()
        for head, contiguous, array in parts:
            h.update(head)
            if contiguous is None:
                data = _row_bytes(array[i] if batched else array)
                h.update(struct.pack("<Q", len(data)) + data)
            else:  # the row's bytes straight from the array's buffer
                h.update(contiguous[i] if batched else contiguous)
        keys.append(h.digest())
    return keys


def _row_bytes(row: np.ndarray) -> bytes:
    if row.dtype.kind == "O":  # BYTES: length-prefixed UTF-8, never object pointers
        parts = [v.encode() if isinstance(v, str) else bytes(v) for v in row.reshape(-1)]
        return b"".join(struct.pack("<Q", len(p)) + p for p in parts)
    return np.ascontiguousarray(row).tobytes()


def encode_row(row: Row) -> bytes | None:
    """Compact binary for Redis: a JSON header of dtypes and shapes, then raw bytes."""
    if any(a.dtype.kind == "O" for a in row):
        return None
    header = orjson.dumps([[a.dtype.str, list(a.shape)] for a in row])
    return struct.pack("<I", len(header)) + header + b"".join(a.tobytes() for a in row)


def decode_row(blob: bytes) -> Row:
    (size,) = struct.unpack_from("<I", blob)
    offset = 4 + size
    row = []
    for dtype, shape in orjson.loads(blob[4:offset]):
        array = np.frombuffer(blob, dtype=np.dtype(dtype), count=int(np.prod(shape)), offset=offset)
        row.append(array.reshape(shape))
        offset += array.nbytes
    return row


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


class InferenceCache:
    """Every version's cache, and the shared tier they all use."""

    def __init__(
        self,
        metrics: Metrics,
        *,
        redis_url: str | None = None,
        ttl_override_s: float | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.metrics = metrics
        self.ttl_override_s = ttl_override_s
        self.clock = clock
        self.shared = SharedTier(redis_url, metrics, clock) if redis_url else None
        self._versions: dict[str, dict[int, VersionCache]] = {}

    def for_version(self, model: LoadedModel) -> VersionCache:
        config = model.config.cache
        ttl = self.ttl_override_s if self.ttl_override_s is not None else config.ttl_s
        cache = VersionCache(
            model,
            ttl_s=ttl,
            max_entries=config.max_entries,
            shared=self.shared,
            metrics=self.metrics,
            clock=self.clock,
        )
        versions = self._versions.setdefault(model.name, {})
        versions[model.version] = cache
        self.metrics.cache_entries.labels(model.name).set_function(
            lambda: sum(len(c) for c in versions.values())
        )
        return cache

    def drop(self, model: LoadedModel) -> None:
        """Forget a version's entries (on unload or reload)."""
        versions = self._versions.get(model.name, {})
        cache = versions.get(model.version)
        if cache is not None and cache.model is model:
            cache.clear()
            del versions[model.version]

    async def aclose(self) -> None:
        if self.shared is not None:
            await self.shared.aclose()

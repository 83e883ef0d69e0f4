"""The inference cache with real TorchScript models: keys, TTL and LRU under an injected
clock, row-level partial hits, Cache-Control policies, single flight and the Redis tier."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from prometheus_client import CollectorRegistry

from tests.support import Doubler, doubler_toml, free_port, redis_up, write_model
from torchgate.errors import InferenceFailed
from torchgate.metrics import Metrics
from torchgate.serving.cache import (
    SHARED_RETRY_S,
    CachePolicy,
    InferenceCache,
    VersionCache,
    decode_row,
    encode_row,
    row_keys,
)
from torchgate.serving.model import LoadedModel
from torchgate.serving.repository import ModelRepository

REDIS_URL = "redis://127.0.0.1:6379/0"
USE, REFRESH, BYPASS = CachePolicy.USE, CachePolicy.REFRESH, CachePolicy.BYPASS


class Salted(Doubler):
    """The Doubler with a random, unused buffer: a model file no earlier run has written, so
    its rows have keys that no earlier run left in the shared Redis."""

    def __init__(self) -> None:
        super().__init__()
        # from the OS, not torch's generator, which another test may have seeded
        self.register_buffer("salt", torch.tensor(list(os.urandom(16)), dtype=torch.uint8))


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class Compute:
    """The compute callable over the real model's forward; records the rows it is given.
    With a gate it waits for it first, so that requests overlap deterministically."""

    def __init__(self, model: LoadedModel, gate: asyncio.Event | None = None) -> None:
        self.model = model
        self.gate = gate
        self.calls: list[np.ndarray] = []
        self.started = asyncio.Event()

    async def __call__(self, inputs: list[np.ndarray], rows: int) -> list[np.ndarray]:
        self.calls.append(inputs[0].copy())
        self.started.set()
        if self.gate is not None:
            await self.gate.wait()
        return self.model.forward(inputs)

    @property
    def rows(self) -> int:
        return sum(len(c) for c in self.calls)


def rows(*values: float) -> np.ndarray:
    return np.array([[v, v + 0.25, -v, 1.0] for v in values], dtype=np.float32)


def load(repo: Path, name: str = "doubler", version: int = 1) -> LoadedModel:
    return ModelRepository(repo, "cpu").load(name).versions[version]


def sample(metrics: Metrics, name: str, **labels: str) -> float:
    return metrics.registry.get_sample_value(name, labels) or 0.0


def new_metrics() -> Metrics:
    return Metrics(CollectorRegistry(), version="test")


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("repo")
    write_model(root, "doubler", Doubler(), doubler_toml(max_batch_size=8), versions=(1, 2))
    write_model(
        root, "tiny", Doubler(), doubler_toml(max_batch_size=8) + "[cache]\nmax_entries = 3\n"
    )
    return root


@pytest.fixture(scope="module")
def doubler(repo: Path) -> LoadedModel:
    return load(repo)


# Cache-Control --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("header", "policy"),
    [
        (None, USE),
        ("", USE),
        ("max-age=60", USE),
        ("public, max-age=600", USE),
        ("no-cache", REFRESH),
        ("No-Cache", REFRESH),
        ("max-age=0", REFRESH),
        ("private , no-cache", REFRESH),
        ("no-store", BYPASS),
        ("NO-STORE", BYPASS),
        ("no-cache, no-store", BYPASS),
        ("max-age=0,no-store", BYPASS),
    ],
)
def test_cache_control_header(header: str | None, policy: CachePolicy) -> None:
    assert CachePolicy.from_header(header) is policy


# keys -----------------------------------------------------------------------------------------

KEY_SCRIPT = """
import sys
from pathlib import Path

import numpy as np

from torchgate.serving.cache import row_keys
from torchgate.serving.repository import ModelRepository

model = ModelRepository(Path(sys.argv[1]), "cpu").load("doubler").versions[1]
x = np.array([[1.0, 1.25, -1.0, 1.0], [2.0, 2.25, -2.0, 1.0]], dtype=np.float32)
print(",".join(k.hex() for k in row_keys(model, [x], 2)))
"""


@pytest.mark.slow
def test_row_keys_are_the_same_in_another_process(repo: Path, doubler: LoadedModel) -> None:
    result = subprocess.run(
        [sys.executable, "-c", KEY_SCRIPT, str(repo)],
        env={**os.environ, "PYTHONHASHSEED": "4242"},  # hash() would differ; the key must not
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    here = [k.hex() for k in row_keys(doubler, [rows(1, 2)], 2)]
    assert result.stdout.strip().split(",") == here
    assert all(len(k) == 64 for k in here) and here[0] != here[1]


def _variant(root: Path, name: str, toml: str, model_file: Path, dirname: str) -> LoadedModel:
    """A model called `name` whose version 1 is a copy of `model_file`, in its own repo."""
    folder = root / dirname / name
    (folder / "1").mkdir(parents=True)
    (folder / "model.toml").write_text(toml)
    shutil.copyfile(model_file, folder / "1" / "model.pt")
    return load(root / dirname, name)


def test_row_keys_depend_on_everything_that_changes_the_answer(tmp_path: Path, repo: Path) -> None:
    pt = repo / "doubler" / "1" / "model.pt"
    base = _variant(tmp_path, "m", doubler_toml(), pt, "base")
    again = _variant(tmp_path, "m", doubler_toml(), pt, "again")
    v1, v2 = load(repo, version=1), load(repo, version=2)
    assert v1.sha256 == v2.sha256  # the same file: only the version number differs
    write_model(tmp_path / "other_file", "m", Salted(), doubler_toml())
    other_file = load(tmp_path / "other_file", "m")
    renamed = _variant(tmp_path, "n", doubler_toml(), pt, "renamed")
    z_input = doubler_toml().replace('name = "x"', 'name = "z"')
    other_input = _variant(tmp_path, "m", z_input, pt, "input")
    int32 = doubler_toml().replace('"FP32"', '"INT32"')
    other_datatype = _variant(tmp_path, "m", int32, pt, "datatype")

    x = rows(1, 2, 3)

    def key(model: LoadedModel, array: np.ndarray = x, row: int = 0) -> bytes:
        return row_keys(model, [array], len(array))[row]

    assert key(base) == key(again)  # loaded twice from two folders: the same key
    assert key(v1) != key(v2)
    assert key(base) != key(other_file)
    assert key(base) != key(renamed)
    assert key(base) != key(other_input)
    assert key(base) != key(other_datatype)  # the very same bytes, read as INT32
    assert key(base, x.reshape(3, 2, 2)) != key(base)  # same bytes, another row shape
    assert key(base, x.reshape(3, 1, 4)) != key(base)
    changed = x.copy()
    changed[0, 3] = np.nextafter(np.float32(1), np.float32(2))  # one ulp in one value
    assert key(base, changed) != key(base)
    # a row's key is its own content, wherever it sits in a request
    assert key(base, x[::-1].copy(), 2) == key(base)
    assert key(base, x, 1) == key(base, rows(2), 0)
    # the float64 copy of the same numbers is other bytes
    assert key(base, x.astype(np.float64)) != key(base)


# TTL and LRU ----------------------------------------------------------------------------------


def test_entries_expire_after_the_ttl(doubler: LoadedModel) -> None:
    clock = Clock()
    metrics = new_metrics()
    cache = InferenceCache(metrics, ttl_override_s=10, clock=clock).for_version(doubler)

    async def body() -> list[str | None]:
        compute = Compute(doubler)
        statuses = []
        for step in (0, 9.9, 0.2, 5):
            clock.advance(step)
            _, status = await cache.run([rows(1)], 1, USE, compute)
            statuses.append(status)
        assert compute.rows == 2
        return statuses

    # stored at 0, still there at 9.9, gone at 10.1 (stored again), there at 15.1
    assert asyncio.run(body()) == ["MISS", "HIT", "MISS", "HIT"]
    assert sample(metrics, "torchgate_cache_entries", model="doubler") == 1
    clock.advance(10)
    assert len(cache) == 0
    assert sample(metrics, "torchgate_cache_entries", model="doubler") == 0
    assert sample(metrics, "torchgate_cache_evictions_total", model="doubler") == 0


def test_lru_eviction_is_counted_and_drops_the_least_recently_used(repo: Path) -> None:
    tiny = load(repo, "tiny")  # [cache] max_entries = 3
    clock = Clock()
    metrics = new_metrics()
    cache = InferenceCache(metrics, ttl_override_s=60, clock=clock).for_version(tiny)

    def evictions() -> float:
        return sample(metrics, "torchgate_cache_evictions_total", model="tiny")

    async def status(*values: float) -> str | None:
        return (await cache.run([rows(*values)], len(values), USE, Compute(tiny)))[1]

    async def body() -> None:
        assert await status(1, 2, 3) == "MISS"
        assert await status(1) == "HIT"  # row 1 is now the most recently used
        assert await status(4) == "MISS"  # evicts row 2, the least recently used
        assert evictions() == 1 and len(cache) == 3
        assert await status(1, 3, 4) == "HIT"
        assert await status(2) == "MISS"  # evicts row 1
        assert evictions() == 2
        clock.advance(61)  # everything expires: expiry is not eviction
        assert await status(5, 6) == "MISS"
        assert evictions() == 2 and len(cache) == 2
        assert await status(7, 8, 9, 10) == "MISS"  # rows 5, 6 and 7 make room
        assert evictions() == 5 and len(cache) == 3
        assert await status(8, 9, 10) == "HIT"

    asyncio.run(body())


# the Redis encoding ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "row",
    [
        [np.arange(4, dtype=np.float32).reshape(1, 4)],
        [np.array([[1.5, -2.0]], dtype=np.float64), np.array([7], dtype=np.int64)],
        [np.array([[True, False]]), np.array([[1, 2]], dtype=np.uint8)],
        [np.array([[0.5, 65504]], dtype=np.float16), np.array(3.0, dtype=np.float32)],
        [np.array([[1, 2, 3]], dtype=">i4")],  # byte order survives
        [np.zeros((1, 0), dtype=np.float32), np.ones((1, 2, 3, 2), dtype=np.int16)],
    ],
)
def test_encode_decode_round_trip(row: list[np.ndarray]) -> None:
    blob = encode_row(row)
    assert blob is not None
    back = decode_row(blob)
    assert len(back) == len(row)
    for a, b in zip(row, back, strict=True):
        assert a.dtype == b.dtype and a.shape == b.shape
        np.testing.assert_array_equal(a, b)


def test_text_outputs_are_not_sent_to_redis() -> None:
    row = [np.array([["a", "b"]], dtype=object), np.array([[1.0]], dtype=np.float32)]
    assert encode_row(row) is None


# the request path -----------------------------------------------------------------------------


def test_only_the_missing_rows_are_computed_and_answers_stay_in_order(doubler) -> None:
    metrics = new_metrics()
    cache = InferenceCache(metrics).for_version(doubler)

    async def body() -> None:
        first = Compute(doubler)
        outputs, status = await cache.run([rows(1, 2)], 2, USE, first)
        assert status == "MISS" and first.rows == 2
        np.testing.assert_array_equal(outputs[0], rows(1, 2) * 2)

        second = Compute(doubler)
        x = rows(3, 1, 4, 2)
        outputs, status = await cache.run([x], 4, USE, second)
        assert status == "PARTIAL"
        assert second.rows == 2
        np.testing.assert_array_equal(second.calls[0], rows(3, 4))  # just the missing rows
        np.testing.assert_array_equal(outputs[0], x * 2)

        third = Compute(doubler)
        outputs, status = await cache.run([rows(4, 3, 2, 1)], 4, USE, third)
        assert status == "HIT" and third.rows == 0
        np.testing.assert_array_equal(outputs[0], rows(4, 3, 2, 1) * 2)

    asyncio.run(body())
    assert sample(metrics, "torchgate_cache_requests_total", model="doubler", result="miss") == 4
    assert sample(metrics, "torchgate_cache_requests_total", model="doubler", result="hit") == 6
    assert sample(metrics, "torchgate_cache_entries", model="doubler") == 4


def test_a_request_repeating_a_row_gets_it_in_every_place(doubler) -> None:
    cache = InferenceCache(new_metrics()).for_version(doubler)

    async def body() -> None:
        x = rows(5, 6, 5)
        outputs, status = await cache.run([x], 3, USE, Compute(doubler))
        assert status == "MISS"
        np.testing.assert_array_equal(outputs[0], x * 2)
        compute = Compute(doubler)
        outputs, status = await cache.run([rows(7, 5, 7)], 3, USE, compute)
        assert status == "PARTIAL"
        np.testing.assert_array_equal(outputs[0], rows(7, 5, 7) * 2)
        assert len(cache) == 3

    asyncio.run(body())


def test_no_cache_skips_the_lookup_but_stores(doubler) -> None:
    cache = InferenceCache(new_metrics()).for_version(doubler)

    async def body() -> None:
        await cache.run([rows(1)], 1, USE, Compute(doubler))
        compute = Compute(doubler)
        outputs, status = await cache.run([rows(1, 2)], 2, REFRESH, compute)
        assert status == "MISS" and compute.rows == 2  # row 1 was cached and computed anyway
        np.testing.assert_array_equal(outputs[0], rows(1, 2) * 2)
        compute = Compute(doubler)
        assert (await cache.run([rows(2, 1)], 2, USE, compute))[1] == "HIT"
        assert compute.rows == 0

    asyncio.run(body())


def test_no_store_neither_reads_nor_writes(doubler) -> None:
    metrics = new_metrics()
    cache = InferenceCache(metrics).for_version(doubler)

    async def body() -> None:
        await cache.run([rows(1)], 1, USE, Compute(doubler))
        compute = Compute(doubler)
        outputs, status = await cache.run([rows(1, 2)], 2, BYPASS, compute)
        assert status is None and compute.rows == 2
        np.testing.assert_array_equal(outputs[0], rows(1, 2) * 2)
        assert len(cache) == 1
        assert (await cache.run([rows(2)], 1, USE, Compute(doubler)))[1] == "MISS"

    asyncio.run(body())
    # the bypassing request was neither a hit nor a miss
    assert sample(metrics, "torchgate_cache_requests_total", model="doubler", result="hit") == 0
    assert sample(metrics, "torchgate_cache_requests_total", model="doubler", result="miss") == 2


def test_a_zero_ttl_turns_the_cache_off(doubler) -> None:
    cache = InferenceCache(new_metrics(), ttl_override_s=0).for_version(doubler)

    async def body() -> None:
        for _ in range(2):
            compute = Compute(doubler)
            assert (await cache.run([rows(1)], 1, USE, compute))[1] is None
            assert compute.rows == 1
        assert len(cache) == 0

    asyncio.run(body())


def test_a_model_without_a_batch_dim_caches_its_whole_outputs(tmp_path: Path) -> None:
    toml = doubler_toml(max_batch_size=0).replace("shape = [4]", "shape = [2, 4]")
    write_model(tmp_path, "whole", Doubler(), toml)
    model = load(tmp_path, "whole")
    cache = InferenceCache(new_metrics()).for_version(model)
    x = rows(1, 2)

    async def body() -> None:
        first, status = await cache.run([x], 1, USE, Compute(model))
        assert status == "MISS"
        compute = Compute(model)
        again, status = await cache.run([x.copy()], 1, USE, compute)
        assert status == "HIT" and compute.rows == 0
        assert again[0].shape == (2, 4)
        np.testing.assert_array_equal(again[0], x * 2)
        np.testing.assert_array_equal(first[0], again[0])

    asyncio.run(body())


# single flight --------------------------------------------------------------------------------


async def fifty_at_once(
    cache: VersionCache, model: LoadedModel, x: np.ndarray
) -> tuple[Compute, list[tuple[list[np.ndarray], str | None]]]:
    """50 identical requests, the first computation held until all have made their lookup."""
    compute = Compute(model, gate=asyncio.Event())
    tasks = [asyncio.ensure_future(cache.run([x.copy()], len(x), USE, compute)) for _ in range(50)]
    await compute.started.wait()
    for _ in range(20):
        await asyncio.sleep(0)  # pacing: yields, so that every task makes its lookup
    compute.gate.set()
    answers = await asyncio.gather(*tasks)
    for outputs, _ in answers:
        np.testing.assert_array_equal(outputs[0], x * 2)
    return compute, answers


def statuses(answers: list[tuple[list[np.ndarray], str | None]]) -> list[str | None]:
    return sorted(status or "" for _, status in answers)


def test_50_concurrent_identical_requests_compute_once(doubler) -> None:
    cache = InferenceCache(new_metrics()).for_version(doubler)
    compute, answers = asyncio.run(fifty_at_once(cache, doubler, rows(1, 2, 3)))
    assert len(compute.calls) == 1 and compute.rows == 3
    assert statuses(answers) == ["HIT"] * 49 + ["MISS"]  # the 49 joined the first
    assert cache._inflight == {}


def test_a_failed_computation_fails_its_joiners_and_is_not_cached(doubler) -> None:
    cache = InferenceCache(new_metrics()).for_version(doubler)
    x = rows(1, 666)

    async def body() -> None:
        compute = Compute(doubler, gate=asyncio.Event())
        tasks = [asyncio.ensure_future(cache.run([x], 2, USE, compute)) for _ in range(5)]
        await compute.started.wait()
        compute.gate.set()
        results = await asyncio.gather(*tasks, return_exceptions=True)
        assert len(compute.calls) == 1
        assert all(isinstance(r, torch.jit.Error) for r in results), results
        assert len(cache) == 0 and cache._inflight == {}
        again = Compute(doubler)
        with pytest.raises(torch.jit.Error):
            await cache.run([x], 2, USE, again)
        assert len(again.calls) == 1

    asyncio.run(body())


def test_a_cancelled_owner_lets_its_joiners_recompute(doubler) -> None:
    cache = InferenceCache(new_metrics()).for_version(doubler)
    x = rows(8)

    async def body() -> None:
        owner_compute = Compute(doubler, gate=asyncio.Event())  # never opens
        owner = asyncio.ensure_future(cache.run([x], 1, USE, owner_compute))
        await owner_compute.started.wait()
        joiner_compute = Compute(doubler)
        joiners = [
            asyncio.ensure_future(cache.run([x.copy()], 1, USE, joiner_compute)) for _ in range(3)
        ]
        for _ in range(5):
            await asyncio.sleep(0)  # pacing: yields, so that every joiner makes its lookup
        assert joiner_compute.calls == []  # they wait for the owner's computation
        owner.cancel()  # the owner's client went away
        with pytest.raises(asyncio.CancelledError):
            await owner
        answers = await asyncio.wait_for(asyncio.gather(*joiners), 10)
        for outputs, _ in answers:
            np.testing.assert_array_equal(outputs[0], x * 2)
        assert joiner_compute.rows == 3  # each joiner computed its row itself
        assert cache._inflight == {}
        compute = Compute(doubler)
        assert (await cache.run([x], 1, USE, compute))[1] == "MISS"

    asyncio.run(body())


def test_a_partial_request_joins_rows_another_request_is_computing(doubler) -> None:
    cache = InferenceCache(new_metrics()).for_version(doubler)

    async def body() -> None:
        first = Compute(doubler, gate=asyncio.Event())
        a = asyncio.ensure_future(cache.run([rows(1, 2)], 2, USE, first))
        await first.started.wait()
        second = Compute(doubler)
        b = asyncio.ensure_future(cache.run([rows(2, 3, 1)], 3, USE, second))
        for _ in range(5):
            await asyncio.sleep(0)  # pacing: yields, so that b makes its lookup
        first.gate.set()
        (out_a, status_a), (out_b, status_b) = await asyncio.gather(a, b)
        assert (status_a, status_b) == ("MISS", "PARTIAL")
        np.testing.assert_array_equal(second.calls[0], rows(3))  # rows 1 and 2 were joined
        np.testing.assert_array_equal(out_b[0], rows(2, 3, 1) * 2)

    asyncio.run(body())


def test_a_version_cache_bounds_its_entries_and_their_age(doubler) -> None:
    metrics = new_metrics()
    clock = Clock()
    cache = VersionCache(doubler, ttl_s=1, max_entries=2, shared=None, metrics=metrics, clock=clock)

    async def body() -> None:
        assert (await cache.run([rows(1, 2, 3)], 3, USE, Compute(doubler)))[1] == "MISS"
        assert len(cache) == 2
        clock.advance(1)
        assert len(cache) == 0

    asyncio.run(body())
    assert sample(metrics, "torchgate_cache_evictions_total", model="doubler") == 1


def test_an_inference_failure_is_not_cached(doubler) -> None:
    cache = InferenceCache(new_metrics()).for_version(doubler)

    async def failing(inputs: list[np.ndarray], rows_: int) -> list[np.ndarray]:
        raise InferenceFailed("model doubler/1 failed on this request (RuntimeError)")

    async def body() -> None:
        with pytest.raises(InferenceFailed):
            await cache.run([rows(9)], 1, USE, failing)
        assert len(cache) == 0 and cache._inflight == {}
        assert (await cache.run([rows(9)], 1, USE, Compute(doubler)))[1] == "MISS"

    asyncio.run(body())


# the Redis tier -------------------------------------------------------------------------------


@pytest.fixture
def salted(tmp_path: Path) -> LoadedModel:
    assert redis_up(6379), "the tests need Redis on 127.0.0.1:6379 (.ci/run starts it)"
    write_model(tmp_path, "salted", Salted(), doubler_toml(max_batch_size=8))
    return load(tmp_path, "salted")


@contextlib.asynccontextmanager
async def shared(
    metrics: Metrics, url: str = REDIS_URL, clock: Callable[[], float] = time.monotonic
) -> AsyncIterator[InferenceCache]:
    """An `InferenceCache` with a Redis tier, as one replica has it."""
    cache = InferenceCache(metrics, redis_url=url, clock=clock)
    try:
        yield cache
    finally:
        await cache.aclose()


def test_a_row_computed_by_one_replica_is_a_hit_on_another(salted) -> None:
    metrics_a, metrics_b = new_metrics(), new_metrics()

    async def body() -> None:
        async with shared(metrics_a) as a, shared(metrics_b) as b:
            on_a, on_b = a.for_version(salted), b.for_version(salted)
            assert (await on_a.run([rows(1, 2)], 2, USE, Compute(salted)))[1] == "MISS"
            compute = Compute(salted)
            outputs, status = await on_b.run([rows(2, 3, 1)], 3, USE, compute)
            assert status == "PARTIAL" and compute.rows == 1
            np.testing.assert_array_equal(outputs[0], rows(2, 3, 1) * 2)
            compute = Compute(salted)
            outputs, status = await on_a.run([rows(3)], 1, USE, compute)
            assert status == "HIT" and compute.rows == 0
            np.testing.assert_array_equal(outputs[0], rows(3) * 2)
            assert len(on_b) == 3  # what came from Redis is kept locally too

    asyncio.run(body())
    for metrics in (metrics_a, metrics_b):
        assert sample(metrics, "torchgate_cache_backend_errors_total") == 0


def test_50_concurrent_identical_requests_compute_once_with_the_redis_tier(salted) -> None:
    """Each request asks Redis first; those that missed there join the one computing."""
    metrics = new_metrics()

    async def body() -> None:
        async with shared(metrics) as inference_cache:
            cache = inference_cache.for_version(salted)
            compute, answers = await fifty_at_once(cache, salted, rows(4, 5))
        assert len(compute.calls) == 1 and compute.rows == 2
        assert statuses(answers) == ["HIT"] * 49 + ["MISS"]

    asyncio.run(body())
    assert sample(metrics, "torchgate_cache_backend_errors_total") == 0


def test_without_redis_the_cache_serves_locally_and_counts_errors(salted) -> None:
    clock = Clock()
    metrics = new_metrics()
    url = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there

    def errors() -> float:
        return sample(metrics, "torchgate_cache_backend_errors_total")

    async def body() -> None:
        async with shared(metrics, url, clock) as inference_cache:
            cache = inference_cache.for_version(salted)
            compute = Compute(salted)
            assert (await cache.run([rows(1)], 1, USE, compute))[1] == "MISS"
            assert errors() == 1 and compute.rows == 1  # the lookup failed; no write tried
            assert (await cache.run([rows(1)], 1, USE, compute))[1] == "HIT"
            assert (await cache.run([rows(2)], 1, USE, compute))[1] == "MISS"
            assert errors() == 1  # Redis is left alone for a while after a failure
            clock.advance(SHARED_RETRY_S)
            assert (await cache.run([rows(3)], 1, USE, compute))[1] == "MISS"
            assert errors() == 2
            assert (await cache.run([rows(1, 2, 3)], 3, USE, compute))[1] == "HIT"

    asyncio.run(body())

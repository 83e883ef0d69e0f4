"""`Residency` against a table of pretend models: single-flight loads, the least recently
used evicted first and never one in use, pinned or busy, the budget never exceeded, the
back-off after a failed load (injected clock), and 503s that say why."""

from __future__ import annotations

import asyncio
import random
from collections import Counter
from collections.abc import Awaitable, Callable

import pytest
from prometheus_client import CollectorRegistry

from tests.support import until
from torchgate.errors import ModelNotReady
from torchgate.metrics import Metrics
from torchgate.serving.budget import Limits
from torchgate.serving.residency import Residency
from torchgate.serving.residents import (
    ON_DEMAND,
    PINNED,
    STARTUP,
    Loaded,
    LoadFailed,
    State,
)

MB = 1 << 20


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Table:
    """The registry's side: models of `sizes` bytes that load at once (or when `gates`
    open), fail when `broken`, and are busy when in `busy`."""

    def __init__(self, sizes: dict[str, int], policies: dict[str, str] | None = None) -> None:
        self.sizes = sizes
        self.actual: dict[str, int] = {}  # measured once loaded, when not its estimate
        self.policies = policies or {}
        self.loads: Counter[str] = Counter()
        self.removed: list[str] = []
        self.serving: set[str] = set()
        self.broken: set[str] = set()
        self.busy_names: set[str] = set()
        self.gates: dict[str, asyncio.Event] = {}

    async def estimate(self, name: str) -> dict[str, int]:
        return {"cpu": self.sizes[name]}

    async def admit(self, name: str) -> Loaded:
        self.loads[name] += 1
        if name in self.gates:
            await self.gates[name].wait()
        await asyncio.sleep(0)  # pacing: a load yields to the loop, as a real one does
        if name in self.broken:
            raise LoadFailed(f"{name}/1/model.pt: not a loadable TorchScript archive")
        self.serving.add(name)
        size = self.actual.get(name, self.sizes[name])
        return Loaded({"cpu": size}, self.policies.get(name, ON_DEMAND), 2.0)

    async def remove(self, name: str) -> None:
        await asyncio.sleep(0)  # pacing: so does a removal
        self.serving.discard(name)
        self.removed.append(name)

    def busy(self, name: str) -> bool:
        return name in self.busy_names


def build(
    table: Table, budget: int | None, clock: Clock | None = None, wait_s: float = 2.0
) -> tuple[Residency, Metrics]:
    metrics = Metrics(CollectorRegistry(), version="test")
    residency = Residency(table, metrics, Limits(host=budget), clock=clock or Clock())
    for name in table.sizes:
        residency.know(name, table.policies.get(name, ON_DEMAND), wait_s)
    return residency, metrics


def value(metrics: Metrics, name: str, **labels: str) -> float:
    return metrics.registry.get_sample_value(name, labels) or 0.0


async def hold(holding: asyncio.Event, done: asyncio.Event) -> None:
    """A request's work: says it holds its model, then holds it until `done`."""
    holding.set()
    await done.wait()


async def request(residency: Residency, name: str, work: Awaitable[object] | None = None) -> str:
    """One request's task: acquire the model, hold it while `work` runs."""

    async def serve() -> str:
        await residency.acquire(name)
        if work is not None:
            await work
        return name

    return await asyncio.create_task(serve())


def run(body: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(body())


def test_fifty_concurrent_first_requests_load_the_model_once():
    table = Table({"a": MB})
    table.gates["a"] = asyncio.Event()
    residency, metrics = build(table, 4 * MB)

    async def body() -> None:
        requests = [asyncio.create_task(request(residency, "a")) for _ in range(50)]
        await until(lambda: residency.status("a").state is State.LOADING)
        assert table.loads == {"a": 1}
        table.gates["a"].set()
        assert await asyncio.gather(*requests) == ["a"] * 50
        assert table.loads == {"a": 1}
        assert value(metrics, "torchgate_model_loads_total", **ok("a")) == 1
        assert value(metrics, "torchgate_model_load_waits_total", model="a") == 50
        assert residency.status("a").state is State.LOADED
        await request(residency, "a")  # loaded: no wait, no load
        assert value(metrics, "torchgate_model_load_waits_total", model="a") == 50

    run(body)


def ok(name: str) -> dict[str, str]:
    return {"model": name, "reason": ON_DEMAND, "result": "ok"}


def test_the_least_recently_used_model_is_evicted():
    table = Table({n: MB for n in "abcd"})
    residency, metrics = build(table, 3 * MB)

    async def body() -> None:
        for name in "abca":  # a used again: b is now the least recently used
            await request(residency, name)
        await request(residency, "d")
        assert table.removed == ["b"] and table.serving == {"a", "c", "d"}
        assert value(metrics, "torchgate_model_evictions_total", model="b") == 1
        status = residency.status("b")
        assert status.state is State.UNLOADED and "evicted to make room" in status.reason
        assert residency.budget.resident() == ["c", "a", "d"]

    run(body)


def test_a_pinned_model_is_never_evicted_and_a_start_up_one_is():
    table = Table({"p": MB, "s": MB, "a": MB, "b": MB}, {"p": PINNED, "s": STARTUP})
    residency, _ = build(table, 3 * MB)

    async def body() -> None:
        for name in ("p", "s"):  # the start-up set, loaded first: least recently used
            table.serving.add(name)
            residency.installed(name, Loaded({"cpu": MB}, table.policies[name], 2.0))
        assert residency.unready() == []
        await request(residency, "a")
        await request(residency, "b")
        assert table.removed == ["s"]
        assert residency.unready() == []  # evicted after it was loaded: still ready
        await request(residency, "s")
        assert table.removed == ["s", "a"] and "p" in table.serving

    run(body)


def test_a_model_in_use_is_never_evicted_and_the_load_waits_for_it():
    table = Table({"a": MB, "b": MB})
    residency, _ = build(table, MB)

    async def body() -> None:
        done, holding = asyncio.Event(), asyncio.Event()
        using_a = asyncio.create_task(request(residency, "a", hold(holding, done)))
        await holding.wait()
        wanting_b = asyncio.create_task(request(residency, "b"))
        await until(lambda: residency.status("b").state is State.LOADING)
        assert not wanting_b.done() and table.removed == [] and table.loads["b"] == 0
        done.set()  # the request on a ends: a may go
        assert await wanting_b == "b"
        assert await using_a == "a"
        assert table.removed == ["a"] and table.serving == {"b"}

    run(body)


def test_a_model_with_queued_work_is_never_evicted():
    table = Table({"a": MB, "b": MB})
    residency, _ = build(table, MB, wait_s=0.3)

    async def body() -> None:
        await request(residency, "a")
        table.busy_names.add("a")  # its batcher has requests queued or running
        with pytest.raises(ModelNotReady) as refused:
            await request(residency, "b")
        assert refused.value.status_code == 503 and refused.value.headers["Retry-After"]
        assert "no room to load model b" in refused.value.message
        assert "in use" in refused.value.message
        assert table.removed == [] and table.loads["b"] == 0
        table.busy_names.clear()
        assert await request(residency, "b") == "b"
        assert table.removed == ["a"]

    run(body)


def test_a_model_larger_than_the_budget_is_refused_at_once():
    table = Table({"p": 3 * MB, "big": 2 * MB, "a": MB}, {"p": PINNED})
    residency, metrics = build(table, 4 * MB)

    async def body() -> None:
        table.serving.add("p")
        residency.installed("p", Loaded({"cpu": 3 * MB}, PINNED, 2.0))
        started = asyncio.get_running_loop().time()
        with pytest.raises(ModelNotReady) as refused:
            await request(residency, "big")
        assert asyncio.get_running_loop().time() - started < 0.2  # no waiting: it never fits
        assert "needs about 2,097,152 bytes of cpu memory" in refused.value.message
        assert "leaves 1,048,576 beside the pinned models" in refused.value.message
        assert value(metrics, "torchgate_model_loads_total", model="big", reason=ON_DEMAND,
                     result="no_room") == 1  # fmt: skip
        assert await request(residency, "a") == "a"

    run(body)


def test_a_failed_load_is_retried_only_after_a_doubling_back_off():
    table = Table({"bad": MB, "good": MB})
    table.broken.add("bad")
    clock = Clock()
    residency, metrics = build(table, 4 * MB, clock)

    async def body() -> None:
        with pytest.raises(ModelNotReady) as first:
            await request(residency, "bad")
        assert first.value.message == (
            "model bad could not be loaded: bad/1/model.pt: not a loadable TorchScript archive"
        )
        assert first.value.headers["Retry-After"] == "10"
        failed = {"model": "bad", "reason": ON_DEMAND, "result": "failed"}
        assert value(metrics, "torchgate_model_loads_total", **failed) == 1
        clock.now += 9
        with pytest.raises(ModelNotReady) as again:
            await request(residency, "bad")
        assert "next try in 1 s" in again.value.message and table.loads["bad"] == 1
        assert "not a loadable TorchScript archive" in residency.status("bad").reason
        assert await request(residency, "good") == "good"  # the others serve meanwhile
        clock.now += 1
        with pytest.raises(ModelNotReady) as second:
            await request(residency, "bad")
        assert table.loads["bad"] == 2 and second.value.headers["Retry-After"] == "20"
        assert value(metrics, "torchgate_model_loads_total", **failed) == 2
        table.broken.clear()  # mended on disk: the next try after the back-off loads it
        clock.now += 20
        assert await request(residency, "bad") == "bad"
        assert residency.status("bad").state is State.LOADED

    run(body)


def test_a_model_larger_than_its_estimate_makes_room_once_loaded():
    table = Table({"a": MB, "b": MB, "c": MB})
    table.actual["c"] = 2 * MB
    residency, _ = build(table, 3 * MB)

    async def body() -> None:
        for name in "abc":
            await request(residency, name)
        assert table.removed == ["a"]  # c measured 2 MB once loaded: a went too
        assert residency.budget.held() == {"cpu": 3 * MB}

    run(body)


def test_a_model_that_does_not_fit_once_measured_is_unloaded_again():
    table = Table({"a": MB, "b": MB})
    table.actual["b"] = 2 * MB
    residency, _ = build(table, 2 * MB, wait_s=0.3)

    async def body() -> None:
        done, holding = asyncio.Event(), asyncio.Event()
        using_a = asyncio.create_task(request(residency, "a", hold(holding, done)))
        await holding.wait()
        with pytest.raises(ModelNotReady) as refused:
            await request(residency, "b")
        assert "no room to load model b" in refused.value.message
        assert table.removed == ["b"] and residency.budget.held() == {"cpu": MB}
        assert "did not fit" in residency.status("b").reason
        done.set()
        await using_a
        assert await request(residency, "b") == "b"  # reserved at its measured size now
        assert table.removed == ["b", "a"]

    run(body)


def test_what_is_held_never_exceeds_the_budget():
    sizes = {f"m{i}": (i % 3 + 1) * MB for i in range(12)}
    table = Table(sizes)
    residency, metrics = build(table, 5 * MB)
    rng = random.Random(7)
    seen: list[int] = []

    async def body() -> None:
        async def one(name: str) -> None:
            await residency.acquire(name)
            seen.append(residency.budget.held().get("cpu", 0))
            await asyncio.sleep(rng.random() / 200)  # pacing: requests of varied length

        async def connection() -> None:  # one request at a time, as a client connection
            for _ in range(25):
                await asyncio.create_task(one(rng.choice(list(sizes))))

        await asyncio.gather(*(connection() for _ in range(4)))

    run(body)
    assert max(seen) <= 5 * MB
    assert value(metrics, "torchgate_model_memory_peak_bytes", device="cpu") <= 5 * MB
    loads = sum(table.loads.values())
    evictions = len(table.removed)
    assert loads - evictions == len(table.serving) and evictions > 20
    counted = sum(value(metrics, "torchgate_model_evictions_total", model=n) for n in sizes)
    assert counted == evictions


def test_without_a_budget_nothing_is_evicted():
    table = Table({n: 100 * MB for n in "abc"})
    residency, metrics = build(table, None)

    async def body() -> None:
        for name in "abc":
            await request(residency, name)
        assert table.removed == [] and table.serving == {"a", "b", "c"}
        assert residency.budget.held() == {"cpu": 300 * MB}

    run(body)
    assert value(metrics, "torchgate_model_memory_budget_bytes", device="cpu") == 0


def test_an_unknown_model_is_left_to_the_registry():
    residency, _ = build(Table({}), MB)

    async def body() -> None:
        await residency.acquire("nope")  # no load, no error: the registry answers 404
        assert residency.status("nope") is None

    run(body)


def test_an_operator_reload_needs_room_only_for_what_it_adds():
    table = Table({"a": MB, "b": MB})
    residency, _ = build(table, 2 * MB)

    async def body() -> None:
        await request(residency, "a")
        await request(residency, "b")
        await residency.load("a")  # the budget is full: a reload of the same files fits
        assert table.loads["a"] == 2 and table.removed == []
        table.sizes["a"] = 2 * MB  # a version added on disk: room for it is made
        table.actual["a"] = 2 * MB
        await residency.load("a")
        assert table.removed == ["b"] and residency.budget.held() == {"cpu": 2 * MB}

    run(body)


def test_an_operator_unload_or_a_failed_load_of_a_new_name_leaves_it_unknown():
    table = Table({"a": MB})
    residency, _ = build(table, 2 * MB)
    table.sizes["new"] = MB  # a folder added after start-up, and broken
    table.broken.add("new")

    async def body() -> None:
        with pytest.raises(LoadFailed):
            await residency.load("new")
        assert residency.status("new") is None  # requests for it stay 404s
        await request(residency, "a")
        await residency.unload("a")
        assert residency.status("a") is None and table.removed == ["a"]
        assert residency.budget.held() == {}

    run(body)

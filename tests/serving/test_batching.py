"""The batcher with a real TorchScript model: batch forming, bounds, deadlines, isolation."""

from __future__ import annotations

import asyncio
import gc
import weakref
from pathlib import Path

import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from tests.support import BREAK, MEND, Breakable, Doubler, doubler_toml, slow_row, write_model
from torchgate.errors import DeadlineExceeded, Draining, InferenceFailed, QueueFull
from torchgate.metrics import Metrics
from torchgate.serving.batching import Batcher, BatcherOptions
from torchgate.serving.repository import ModelRepository


@pytest.fixture(scope="module")
def doubler(tmp_path_factory):
    repo = tmp_path_factory.mktemp("repo")
    write_model(repo, "doubler", Doubler(), doubler_toml(max_batch_size=4))
    return ModelRepository(Path(repo), "cpu").load("doubler").versions[1]


def rows(*values: float) -> np.ndarray:
    return np.array([[v, 0, 0, 0] for v in values], dtype=np.float32)


def slow(tenths: int = 4) -> np.ndarray:
    return np.array([slow_row(tenths)], dtype=np.float32)


def sample(metrics: Metrics, name: str) -> float:
    value = metrics.registry.get_sample_value(name, {"model": "doubler", "version": "1"})
    return value or 0.0


async def with_batcher(model, body, **options):
    metrics = Metrics(CollectorRegistry(), version="test")
    opts = BatcherOptions(**{"max_batch_size": 4, **options})
    batcher = Batcher(model, opts, metrics.for_batcher("doubler", "1"))
    batcher.start()
    try:
        return await body(batcher, metrics)
    finally:
        await batcher.aclose()


def run(model, body, **options):
    return asyncio.run(with_batcher(model, body, **options))


def test_requests_queued_while_busy_form_one_batch(doubler):
    async def body(batcher, metrics):
        held = batcher.submit([slow()], 1)
        await asyncio.sleep(0.05)  # the runner has taken the slow request
        futures = [batcher.submit([rows(i)], 1) for i in range(4)]
        results = await asyncio.gather(held, *futures)
        for i, result in enumerate(results[1:]):
            np.testing.assert_array_equal(result.outputs[0], rows(i) * 2)
        return metrics

    metrics = run(doubler, body)
    assert sample(metrics, "torchgate_batch_size_count") == 2
    assert sample(metrics, "torchgate_batch_size_sum") == 5


def test_a_request_is_never_split_across_forwards(doubler):
    async def body(batcher, metrics):
        held = batcher.submit([slow()], 1)
        await asyncio.sleep(0.05)
        a = batcher.submit([rows(1, 2, 3)], 3)
        b = batcher.submit([rows(4, 5, 6)], 3)
        c = batcher.submit([rows(7, 8)], 2)
        _, ra, rb, rc = await asyncio.gather(held, a, b, c)
        np.testing.assert_array_equal(rb.outputs[0], rows(4, 5, 6) * 2)
        np.testing.assert_array_equal(rc.outputs[0], rows(7, 8) * 2)
        return metrics

    metrics = run(doubler, body)
    assert sample(metrics, "torchgate_batch_size_count") == 4  # [slow] [a] [b] [c]
    assert sample(metrics, "torchgate_batch_size_sum") == 9


def test_max_delay_gathers_company(doubler):
    async def body(batcher, metrics):
        futures = []
        for i in range(3):
            futures.append(batcher.submit([rows(i)], 1))
            await asyncio.sleep(0.01)
        await asyncio.gather(*futures)
        return metrics

    metrics = run(doubler, body, max_delay_s=0.5)
    assert sample(metrics, "torchgate_batch_size_count") == 1
    assert sample(metrics, "torchgate_batch_size_sum") == 3


def test_full_queue_refuses_at_once(doubler):
    async def body(batcher, metrics):
        held = batcher.submit([slow()], 1)
        await asyncio.sleep(0.05)
        queued = [batcher.submit([rows(1, 2)], 2), batcher.submit([rows(3, 4)], 2)]
        with pytest.raises(QueueFull) as refused:
            batcher.submit([rows(5)], 1)
        assert refused.value.headers["Retry-After"] == "1"
        await asyncio.gather(held, *queued)
        batcher.submit([rows(5)], 1).cancel()  # room again once the queue moved
        return metrics

    metrics = run(doubler, body, max_queue_rows=4)
    shed = metrics.registry.get_sample_value(
        "torchgate_shed_total", {"model": "doubler", "reason": "queue_full"}
    )
    assert shed == 1


def test_request_past_its_deadline_gets_504_and_is_not_computed(doubler):
    async def body(batcher, metrics):
        held = batcher.submit([slow(20)], 1, deadline=batcher.clock() + 60)
        await asyncio.sleep(0.05)  # pacing: the runner takes the slow one
        late = batcher.submit([rows(1)], 1)
        with pytest.raises(DeadlineExceeded, match="in the queue"):
            await late
        await held
        # a request whose forward outlasts its deadline is answered at the deadline
        started = batcher.clock()
        with pytest.raises(DeadlineExceeded, match="while its batch was computed"):
            await batcher.submit([slow(20)], 1)
        assert batcher.clock() - started < 0.5  # not the forward's whole second
        return metrics

    metrics = run(doubler, body, timeout_s=0.1)
    assert sample(metrics, "torchgate_batch_size_count") >= 1


def test_cancelled_request_is_dropped_before_compute(doubler):
    async def body(batcher, metrics):
        held = batcher.submit([slow()], 1)
        await asyncio.sleep(0.05)
        gone = batcher.submit([rows(1)], 1)
        kept = batcher.submit([rows(2)], 1)
        gone.cancel()
        await asyncio.gather(held, kept)
        assert batcher.queued_rows == 0
        return metrics

    metrics = run(doubler, body)
    assert sample(metrics, "torchgate_batch_size_sum") == 2  # slow + kept


def test_poisoned_request_fails_alone(doubler):
    async def body(batcher, metrics):
        held = batcher.submit([slow()], 1)
        await asyncio.sleep(0.05)
        good1 = batcher.submit([rows(1)], 1)
        bad = batcher.submit([rows(666)], 1)
        good2 = batcher.submit([rows(2, 3)], 2)
        await held
        np.testing.assert_array_equal((await good1).outputs[0], rows(1) * 2)
        np.testing.assert_array_equal((await good2).outputs[0], rows(2, 3) * 2)
        with pytest.raises(InferenceFailed) as failed:
            await bad
        assert "Traceback" not in failed.value.message
        assert failed.value.input_fault  # its neighbours succeeded: the input is at fault
        with pytest.raises(InferenceFailed) as alone:
            await batcher.submit([rows(666)], 1)
        # alone in its forward, but the probe on known-good input succeeded
        assert alone.value.input_fault
        # the batcher keeps serving
        np.testing.assert_array_equal((await batcher.submit([rows(4)], 1)).outputs[0], rows(4) * 2)
        return metrics

    run(doubler, body)


def test_a_broken_model_fails_its_probe(tmp_path):
    write_model(tmp_path, "breakable", Breakable(), doubler_toml(max_batch_size=4))
    model = ModelRepository(tmp_path, "cpu").load("breakable").versions[1]

    async def body(batcher, metrics):
        with pytest.raises(InferenceFailed) as broke:
            await batcher.submit([rows(BREAK)], 1)
        assert not broke.value.input_fault  # the probe on zeros failed too: the model's fault
        with pytest.raises(InferenceFailed) as still:
            await batcher.submit([rows(1)], 1)
        assert not still.value.input_fault
        with pytest.raises(InferenceFailed) as poisoned:
            await batcher.submit([rows(666)], 1)
        assert not poisoned.value.input_fault  # still broken, so not the input's either
        np.testing.assert_array_equal(
            (await batcher.submit([rows(MEND)], 1)).outputs[0], rows(MEND) * 2
        )
        with pytest.raises(InferenceFailed) as poisoned:
            await batcher.submit([rows(666)], 1)
        assert poisoned.value.input_fault  # mended: the probe succeeds
        return metrics

    run(model, body)


def test_drain_answers_everything_queued_then_refuses(doubler):
    async def body(batcher, metrics):
        held = batcher.submit([slow()], 1)
        await asyncio.sleep(0.05)
        queued = [batcher.submit([rows(i)], 1) for i in range(8)]
        assert await batcher.drain(10)
        results = await asyncio.gather(held, *queued)
        assert len(results) == 9
        with pytest.raises(Draining):
            batcher.submit([rows(1)], 1)
        return metrics

    run(doubler, body)


def test_several_instances_compute_in_parallel(doubler):
    async def body(batcher, metrics):
        first = batcher.submit([slow(2)], 1)
        await asyncio.sleep(0.02)
        second = batcher.submit([slow(2)], 1)
        await asyncio.gather(first, second)
        return metrics

    metrics = run(doubler, body, instances=2)
    assert sample(metrics, "torchgate_batch_size_count") == 2


def test_a_closed_batcher_is_freed_without_a_collection(doubler):
    """An evicted model's memory comes back at once, with no full collection (a pause of
    the event loop): nothing the batcher built points back at it once it is closed."""

    async def body() -> weakref.ref[Batcher]:
        metrics = Metrics(CollectorRegistry(), version="test")
        children = metrics.for_batcher("doubler", "1")
        batcher = Batcher(doubler, BatcherOptions(max_batch_size=4), children)
        batcher.start()
        await batcher.submit([rows(1)], 1, deadline=batcher.clock() + 60)
        await batcher.aclose()
        Metrics.unbind(children)
        return weakref.ref(batcher)

    gc.disable()
    try:
        ref = asyncio.run(body())
        assert ref() is None
    finally:
        gc.enable()

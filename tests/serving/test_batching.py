"""The batcher: batch forming, bounds, deadlines, isolation, drain, parallel instances.

Driven by `GatedModel` (every forward waits until the test lets it through) and, where
time matters, a `FakeClock`: what a batch holds is decided by the test's steps, never by
a sleep. One test runs a real TorchScript model through the same path.
"""

from __future__ import annotations

import asyncio
import gc
import weakref
from pathlib import Path

import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from tests.serving.gated import POISON, FakeClock, GatedModel
from tests.support import Doubler, doubler_toml, until, write_model
from torchgate.errors import DeadlineExceeded, Draining, InferenceFailed, QueueFull
from torchgate.metrics import Metrics
from torchgate.serving.batch_metrics import BatcherMetrics
from torchgate.serving.batching import Batcher, BatcherOptions
from torchgate.serving.queue import STANDING_MIN_S
from torchgate.serving.repository import ModelRepository


def rows(*values: float) -> np.ndarray:
    return np.array([[v, 0, 0, 0] for v in values], dtype=np.float32)


def sample(metrics: Metrics, name: str, **labels: str) -> float:
    value = metrics.registry.get_sample_value(name, {"model": "fake", "version": "1", **labels})
    return value or 0.0


def run(model, body, clock=None, **options):
    """Run `body(batcher, metrics)` against a started batcher over `model`; its metrics."""

    async def main():
        metrics = Metrics(CollectorRegistry(), version="test")
        opts = BatcherOptions(**{"max_batch_size": 4, **options})
        extra = {} if clock is None else {"clock": clock}
        batcher = Batcher(model, opts, BatcherMetrics.bind(metrics, "fake", "1"), **extra)
        batcher.start()
        try:
            await body(batcher, metrics)
        finally:
            if isinstance(model, GatedModel):
                model.open()  # a failed assertion must not leave a runner at the gate
            await batcher.aclose()
        return metrics

    return asyncio.run(main())


@pytest.fixture
def model() -> GatedModel:
    return GatedModel(max_batch_size=4)


def test_requests_queued_while_busy_form_one_batch(model):
    async def body(batcher, metrics):
        held = batcher.submit([rows(100)], 1)
        assert await model.started() == [100]
        futures = [batcher.submit([rows(i)], 1) for i in range(4)]
        model.open()
        results = await asyncio.gather(held, *futures)
        for i, result in enumerate(results[1:]):
            np.testing.assert_array_equal(result.outputs[0], rows(i) * 2)

    metrics = run(model, body)
    assert model.forwards == [[100], [0, 1, 2, 3]]
    assert sample(metrics, "torchgate_batch_size_count") == 2
    assert sample(metrics, "torchgate_batch_size_sum") == 5


def test_a_request_is_never_split_across_forwards(model):
    async def body(batcher, metrics):
        held = batcher.submit([rows(100)], 1)
        await model.started()
        a = batcher.submit([rows(1, 2, 3)], 3)
        b = batcher.submit([rows(4, 5, 6)], 3)
        c = batcher.submit([rows(7, 8)], 2)
        model.open()
        _, _, rb, rc = await asyncio.gather(held, a, b, c)
        np.testing.assert_array_equal(rb.outputs[0], rows(4, 5, 6) * 2)
        np.testing.assert_array_equal(rc.outputs[0], rows(7, 8) * 2)

    run(model, body)
    assert model.forwards == [[100], [1, 2, 3], [4, 5, 6], [7, 8]]


def test_max_delay_waits_for_company_until_the_batch_is_full(model):
    clock = FakeClock()  # never moves: the delay cannot run out, only the batch fill up

    async def body(batcher, metrics):
        futures = []
        for i in range(3):
            futures.append(batcher.submit([rows(i)], 1))
            await until(lambda: batcher.queued_rows == 0)  # the runner holds it, waiting
        futures.append(batcher.submit([rows(3)], 1))
        model.open()
        await asyncio.gather(*futures)

    run(model, body, clock=clock, max_delay_s=0.5)
    assert model.forwards == [[0, 1, 2, 3]]


def test_max_delay_runs_a_lone_request_when_it_is_over(model):
    model.open()

    async def body(batcher, metrics):
        result = await batcher.submit([rows(7)], 1)
        np.testing.assert_array_equal(result.outputs[0], rows(7) * 2)

    run(model, body, max_delay_s=0.05)
    assert model.forwards == [[7]]


def test_full_queue_refuses_at_once(model):
    async def body(batcher, metrics):
        held = batcher.submit([rows(100)], 1)
        await model.started()
        queued = [batcher.submit([rows(1, 2)], 2), batcher.submit([rows(3, 4)], 2)]
        with pytest.raises(QueueFull) as refused:
            batcher.submit([rows(5)], 1)
        assert refused.value.headers["Retry-After"] == "1"
        model.open()
        await asyncio.gather(held, *queued)
        await batcher.submit([rows(5)], 1)  # room again once the queue moved

    metrics = run(model, body, max_queue_rows=4)
    shed = metrics.registry.get_sample_value(
        "torchgate_shed_total", {"model": "fake", "reason": "queue_full"}
    )
    assert shed == 1


def test_deadlines_fail_requests_queued_or_computing_and_skip_their_forward(model):
    clock = FakeClock()

    async def body(batcher, metrics):
        held = batcher.submit([rows(100)], 1, deadline=clock() + 600)
        await model.started()
        late = batcher.submit([rows(1)], 1)  # due in timeout_s, by the batcher's clock
        clock.advance(9.9)
        batcher.expiry.check()  # what the timer runs
        assert not late.done()
        clock.advance(0.2)
        batcher.expiry.check()
        with pytest.raises(DeadlineExceeded, match="in the queue"):
            await late
        model.let_through()
        await held
        # a request whose forward outlasts its deadline is answered at the deadline
        computing = batcher.submit([rows(2)], 1)
        assert await model.started() == [2]
        clock.advance(10.1)
        batcher.expiry.check()
        with pytest.raises(DeadlineExceeded, match="while its batch was computed"):
            await computing
        model.let_through()
        await until(lambda: batcher.idle)

    metrics = run(model, body, clock=clock, timeout_s=10)
    assert model.forwards == [[100], [2]]  # the expired queued request never ran
    shed = metrics.registry.get_sample_value(
        "torchgate_shed_total", {"model": "fake", "reason": "deadline"}
    )
    assert shed == 2


def test_a_standing_queue_is_served_newest_first():
    clock = FakeClock()
    model = GatedModel(max_batch_size=2)

    async def body(batcher, metrics):
        held = batcher.submit([rows(100)], 1, deadline=clock() + 600)
        await model.started()
        queued = [batcher.submit([rows(i)], 1, deadline=clock() + 600) for i in range(4)]
        # the oldest has now waited longer than a few forwards: the held one's forward (at
        # the gate meanwhile) is measured as this long too, and patience is 4 x a fifth of it
        clock.advance(STANDING_MIN_S * 10)
        model.open()
        await asyncio.gather(held, *queued)

    run(model, body, clock=clock, max_batch_size=2)
    assert model.forwards == [[100], [3, 2], [1, 0]]


def test_a_fresh_queue_is_served_oldest_first():
    model = GatedModel(max_batch_size=2)

    async def body(batcher, metrics):
        held = batcher.submit([rows(100)], 1)
        await model.started()
        queued = [batcher.submit([rows(i)], 1) for i in range(4)]
        model.open()
        await asyncio.gather(held, *queued)

    run(model, body, clock=FakeClock(), max_batch_size=2)
    assert model.forwards == [[100], [0, 1], [2, 3]]


def test_cancelled_request_is_dropped_before_compute(model):
    async def body(batcher, metrics):
        held = batcher.submit([rows(100)], 1)
        await model.started()
        gone = batcher.submit([rows(1)], 1)
        kept = batcher.submit([rows(2)], 1)
        gone.cancel()
        model.open()
        await asyncio.gather(held, kept)
        assert batcher.queued_rows == 0

    metrics = run(model, body)
    assert model.forwards == [[100], [2]]
    assert sample(metrics, "torchgate_batch_size_sum") == 2


def test_poisoned_request_fails_alone(model):
    async def body(batcher, metrics):
        held = batcher.submit([rows(100)], 1)
        await model.started()
        good1 = batcher.submit([rows(1)], 1)
        bad = batcher.submit([rows(POISON)], 1)
        good2 = batcher.submit([rows(2, 3)], 2)
        model.open()
        await held
        np.testing.assert_array_equal((await good1).outputs[0], rows(1) * 2)
        np.testing.assert_array_equal((await good2).outputs[0], rows(2, 3) * 2)
        with pytest.raises(InferenceFailed) as failed:
            await bad
        assert "Traceback" not in failed.value.message
        assert failed.value.input_fault  # its neighbours succeeded: the input is at fault
        with pytest.raises(InferenceFailed) as alone:
            await batcher.submit([rows(POISON)], 1)
        # alone in its forward, but the probe on known-good input succeeded
        assert alone.value.input_fault
        # the batcher keeps serving
        np.testing.assert_array_equal((await batcher.submit([rows(4)], 1)).outputs[0], rows(4) * 2)

    metrics = run(model, body)
    # the batch of three, then each of its requests alone; the poisoned one alone, the probe
    assert model.forwards[1:6] == [[1, POISON, 2, 3], [1], [POISON], [2, 3], [POISON]]
    assert sample(metrics, "torchgate_batch_retries_total") == 1


def test_a_broken_model_fails_its_probe(model):
    model.open()

    async def body(batcher, metrics):
        model.broken = True
        with pytest.raises(InferenceFailed) as broke:
            await batcher.submit([rows(1)], 1)
        assert not broke.value.input_fault  # the probe on zeros failed too: the model's fault
        with pytest.raises(InferenceFailed) as poisoned:
            await batcher.submit([rows(POISON)], 1)
        assert not poisoned.value.input_fault  # still broken, so not the input's either
        model.broken = False
        np.testing.assert_array_equal((await batcher.submit([rows(1)], 1)).outputs[0], rows(1) * 2)
        with pytest.raises(InferenceFailed) as poisoned:
            await batcher.submit([rows(POISON)], 1)
        assert poisoned.value.input_fault  # mended: the probe succeeds

    run(model, body)
    assert model.forwards[1] == [0]  # the probe: known-good zeros


def test_drain_answers_everything_queued_then_refuses(model):
    async def body(batcher, metrics):
        held = batcher.submit([rows(100)], 1)
        await model.started()
        queued = [batcher.submit([rows(i)], 1) for i in range(8)]
        drained = asyncio.create_task(batcher.drain(10))
        await until(lambda: not batcher.accepting)
        with pytest.raises(Draining):
            batcher.submit([rows(1)], 1)
        assert not drained.done()
        model.open()
        assert await drained
        results = await asyncio.gather(held, *queued)
        assert len(results) == 9

    run(model, body)


def test_a_drain_that_cannot_finish_says_so(model):
    async def body(batcher, metrics):
        held = batcher.submit([rows(100)], 1)
        await model.started()
        assert not await batcher.drain(0.01)
        model.open()
        await held

    run(model, body)


def test_several_instances_compute_in_parallel(model):
    async def body(batcher, metrics):
        first = batcher.submit([rows(1)], 1)
        assert await model.started() == [1]
        second = batcher.submit([rows(2)], 1)
        assert await model.started() == [2]  # while the first is still at the gate
        model.open()
        await asyncio.gather(first, second)

    metrics = run(model, body, instances=2)
    assert sample(metrics, "torchgate_batch_size_count") == 2


def test_closing_finishes_the_forward_and_answers_the_queue_with_draining(model):
    async def body(batcher, metrics):
        held = batcher.submit([rows(100)], 1)
        await model.started()
        queued = batcher.submit([rows(1)], 1)
        closing = asyncio.create_task(batcher.aclose())
        await until(lambda: not batcher.accepting)
        assert not queued.done()  # the forward in progress ends first
        model.open()
        await closing
        np.testing.assert_array_equal((await held).outputs[0], rows(100) * 2)
        with pytest.raises(Draining):
            await queued

    run(model, body)
    assert model.forwards == [[100]]


def test_a_real_torchscript_model_batches_through_the_same_path(tmp_path):
    write_model(tmp_path, "doubler", Doubler(), doubler_toml(max_batch_size=4))
    doubler = ModelRepository(Path(tmp_path), "cpu").load("doubler").versions[1]

    async def body(batcher, metrics):
        futures = [batcher.submit([rows(i, i + 1)], 2) for i in range(3)]
        for i, result in enumerate(await asyncio.gather(*futures)):
            np.testing.assert_array_equal(result.outputs[0], rows(i, i + 1) * 2)
        with pytest.raises(InferenceFailed) as failed:
            await batcher.submit([rows(POISON)], 1)
        assert failed.value.input_fault

    run(doubler, body)


def test_a_closed_batcher_is_freed_without_a_collection(model):
    """An evicted model's memory comes back at once, with no full collection (a pause of
    the event loop): nothing the batcher built points back at it once it is closed."""
    model.open()

    async def body() -> weakref.ref[Batcher]:
        metrics = Metrics(CollectorRegistry(), version="test")
        children = BatcherMetrics.bind(metrics, "fake", "1")
        batcher = Batcher(model, BatcherOptions(max_batch_size=4), children)
        batcher.start()
        await batcher.submit([rows(1)], 1, deadline=batcher.clock() + 60)
        await batcher.aclose()
        children.unbind()
        return weakref.ref(batcher)

    gc.disable()
    try:
        ref = asyncio.run(body())
        assert ref() is None
    finally:
        gc.enable()

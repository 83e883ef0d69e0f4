"""`InferenceService`: the request path after decoding, shared by every protocol.

A decoded request goes: model router (version) -> inference cache -> circuit breaker ->
batcher; the outputs come back with where the time went, ready for a codec to encode.
Once it is answered, the outcome is recorded on its side of a running rollout (canary
or stable) and the rows go to the drift window (cheap appends: the deciding and scoring
happen elsewhere).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np

from torchgate.errors import (
    CircuitOpen,
    ClientDisconnected,
    DeadlineExceeded,
    Draining,
    InferenceFailed,
)
from torchgate.lifecycle.arm import Arm
from torchgate.metrics import Metrics
from torchgate.processors.text import TextProcessor
from torchgate.serving.cache import CachePolicy
from torchgate.serving.execution import BatchResult
from torchgate.serving.registry import ModelRegistry
from torchgate.serving.scores import top_classes
from torchgate.serving.served import ServedVersion

T = TypeVar("T")


@dataclass(slots=True)
class InferenceResult:
    """What a codec needs to answer: outputs (batch dim first) and how they were made."""

    served: ServedVersion
    outputs: list[np.ndarray]
    queue_s: float = 0.0
    compute_s: float = 0.0
    cache: str | None = None
    top: np.ndarray | None = None
    top_probability: np.ndarray | None = None


class InferenceService:
    """Runs decoded requests through the serving core."""

    def __init__(
        self,
        registry: ModelRegistry,
        metrics: Metrics,
        *,
        draining: Callable[[], bool] = lambda: False,
    ) -> None:
        self.registry = registry
        self.metrics = metrics
        self._class_counters: dict[tuple[str, tuple[str, ...]], list[Any]] = {}
        self._draining = draining

    async def infer(
        self,
        served: ServedVersion,
        inputs: list[np.ndarray],
        rows: int,
        *,
        disconnected: Callable[[], Awaitable[None]] | None = None,
        cache_policy: CachePolicy = CachePolicy.USE,
        canary: Arm | None = None,
        caller: str = "",
        tenant: str = "",
        material: list[bytes] | None = None,
        deadline: float | None = None,
    ) -> InferenceResult:
        """Cache, then breaker, then batcher, for the rows the cache does not have.
        `disconnected` returns once the client has gone (a request that may wait long is
        dropped then); `cache_policy` is what the client's Cache-Control allows;
        `canary`: the side of a rollout that routed this request to its version;
        `caller`: who sent it (a key's name or an address), for failures that may be the
        input's fault; `tenant`: the cache's namespace ("" for the one every caller shares);
        `material`: what a preprocessor made each row from, which keys its cache entry."""
        if self._draining():
            self.metrics.shed.labels(served.name, "draining").inc()
            raise Draining()
        answer = InferenceResult(served, [])

        async def compute(subset: list[np.ndarray], subset_rows: int) -> list[np.ndarray]:
            breaker = served.breaker
            try:
                breaker.allow()
            except CircuitOpen:
                self.metrics.shed.labels(served.name, "circuit_open").inc()
                raise
            try:
                # a request that will be computed within milliseconds gains nothing from a
                # disconnect watcher: only one that may wait long gets one
                waits = served.batcher.may_wait_long()
                future = _submit(served, subset, subset_rows, deadline)
                if disconnected is None or not waits:
                    result = await future
                else:
                    result = await _unless_disconnected(future, disconnected)
            except InferenceFailed as exc:
                # the model worked on other input meanwhile: the input may be at fault, and
                # counts only when several callers fail so (see breaker.py)
                if exc.input_fault:
                    breaker.suspect(caller)
                else:
                    breaker.failure()
                raise
            except DeadlineExceeded:
                # one caller's slow inputs can expire its own requests: suspect too
                breaker.suspect(caller)
                raise
            except BaseException:  # client errors, shed load, disconnects: no verdict
                breaker.release()
                raise
            breaker.success()
            answer.queue_s, answer.compute_s = result.queue_s, result.compute_s
            answer.top, answer.top_probability = result.top, result.top_probability
            return result.outputs

        work = served.cache.run(inputs, rows, cache_policy, compute, tenant, material)
        answer.outputs, answer.cache = await (
            work if canary is None else _watched(canary, work, caller)
        )
        self._label(answer)
        if served.drift is not None:
            served.drift.observe(inputs[0], answer.top)
        return answer

    def _label(self, result: InferenceResult) -> None:
        """Top class and probability per row for models with labels, counted by class."""
        labels = result.served.config.labels
        if labels is None or not result.served.config.batched:
            return
        if result.top is None or result.cache not in (None, "MISS"):
            # rows from the cache: the batcher scored only those it computed, if any
            result.top, result.top_probability = top_classes(result.outputs[0])
        top = result.top
        key = (result.served.name, labels)
        by_class = self._class_counters.get(key)
        if by_class is None:  # bound once per model: labels() costs a lock and a lookup
            counter = self.metrics.predictions
            by_class = self._class_counters[key] = [counter.labels(key[0], c) for c in labels]
        if len(top) == 1:
            by_class[int(top[0])].inc()
            return
        for index, count in enumerate(np.bincount(top, minlength=len(labels))):
            if count:
                by_class[index].inc(int(count))


def _submit(
    served: ServedVersion, inputs: list[np.ndarray], rows: int, deadline: float | None
) -> asyncio.Future[BatchResult]:
    """Queue a request's rows: as one piece, or for a model batched by tokens row by row,
    each cut to its own length, so that the batcher packs rows of similar length from
    every request (a request of many texts then spans several batches)."""
    batcher = served.batcher
    pre = served.model.preprocessor
    if batcher.options.max_batch_tokens is None or not isinstance(pre, TextProcessor):
        return batcher.submit(inputs, rows, deadline)
    lengths = pre.lengths(inputs).tolist()
    futures = batcher.submit_rows(
        [([a[i : i + 1, : max(n, 1)] for a in inputs], n) for i, n in enumerate(lengths)],
        deadline,
    )
    return asyncio.ensure_future(_joined(futures))


async def _joined(futures: list[asyncio.Future[BatchResult]]) -> BatchResult:
    """Every row's result, in order, as one; when one fails, the rest are dropped."""
    try:
        results = await asyncio.gather(*futures)
    except BaseException:
        for future in futures:
            if not future.done():
                future.cancel()
            elif not future.cancelled():
                future.exception()  # seen: the first failure is the one raised
        raise
    if len(results) == 1:
        return results[0]
    tops = [r.top for r in results]
    probabilities = [r.top_probability for r in results]
    return BatchResult(
        [np.concatenate(parts) for parts in zip(*(r.outputs for r in results), strict=True)],
        max(r.queue_s for r in results),
        max(r.compute_s for r in results),
        None if any(t is None for t in tops) else np.concatenate(tops),
        None if any(p is None for p in probabilities) else np.concatenate(probabilities),
    )


async def _watched(canary: Arm, work: Awaitable[T], caller: str) -> T:
    """Await `work`, recording its outcome on its side of the rollout: a failure is a
    server-side one of the model path (the model raised, the deadline passed, the circuit
    is open); one that may be the input's fault counts only as the breaker's do
    (`Arm.suspect`)."""
    started = time.perf_counter()
    try:
        result = await work
    except InferenceFailed as exc:
        if exc.input_fault:
            canary.suspect(caller, time.perf_counter() - started)
        else:
            canary.record(True, time.perf_counter() - started)
        raise
    except DeadlineExceeded:
        canary.suspect(caller, time.perf_counter() - started)
        raise
    except CircuitOpen:
        canary.record(True, time.perf_counter() - started)
        raise
    canary.record(False, time.perf_counter() - started)
    return result


async def _unless_disconnected(
    future: asyncio.Future[T], disconnected: Callable[[], Awaitable[None]]
) -> T:
    """Await `future`, cancelling it (so it is never computed) if the client goes away."""

    async def watch() -> None:
        await disconnected()
        future.cancel()

    watcher = asyncio.ensure_future(watch())
    try:
        return await future
    except asyncio.CancelledError:
        if watcher.done() and not watcher.cancelled():
            raise ClientDisconnected() from None
        raise
    finally:
        watcher.cancel()

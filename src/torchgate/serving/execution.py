"""`Execution`: running one batch on a model, in a runner thread.

The batch's inputs are stacked (rows of different lengths padded when the model says how)
and run in one forward; the outputs are split back per request, with each row's top class
for a model with labels. A failing batch is retried request by request, so one poisoned
input fails only itself; when no request of it succeeds, one probe forward on the
signature's known-good input tells whether the model still works (the failures are then
the inputs' fault) or is broken. `Forward` is all it needs of a model.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from torchgate.serving.batch_metrics import BatcherMetrics
from torchgate.serving.model import dummy_inputs
from torchgate.serving.model_config import ModelConfig
from torchgate.serving.queue import Pending
from torchgate.serving.scores import top_classes

log = logging.getLogger("torchgate.batching")


class Forward(Protocol):
    """A model as a batcher runs it (`LoadedModel` is one; tests pass fakes)."""

    @property
    def key(self) -> str: ...

    @property
    def config(self) -> ModelConfig: ...

    def forward(self, inputs: list[np.ndarray], instance: int = 0) -> list[np.ndarray]: ...


@dataclass(slots=True)
class BatchResult:
    """One request's share of a forward: its outputs, where its time went, and for a
    model with labels each row's top class and its probability."""

    outputs: list[np.ndarray]
    queue_s: float
    compute_s: float
    top: np.ndarray | None = None
    top_probability: np.ndarray | None = None


@dataclass(slots=True)
class Outcome:
    """One request's share of a forward, or its failure."""

    outputs: list[np.ndarray] | None = None
    error: BaseException | None = None
    compute_s: float = 0.0
    input_fault: bool = False  # failed while the model worked on other input
    top: np.ndarray | None = None
    top_probability: np.ndarray | None = None

    def result(self, queue_s: float) -> BatchResult:
        assert self.outputs is not None
        return BatchResult(self.outputs, queue_s, self.compute_s, self.top, self.top_probability)


class Execution:
    def __init__(
        self,
        model: Forward,
        metrics: BatcherMetrics,
        *,
        pad: tuple[float, ...] | None = None,
        by_tokens: bool = False,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.model = model
        self.metrics = metrics
        self.pad = pad
        self.by_tokens = by_tokens
        self.clock = clock
        self._batched = model.config.batched
        self._scored = self._batched and model.config.labels is not None
        self.tokens = [0, 0]  # real and padded tokens computed so far

    def padding_ratio(self) -> float:
        """Padded tokens over real tokens computed so far (1.0 before any)."""
        real, padded = self.tokens
        return padded / real if real else 1.0

    def run(self, batch: list[Pending], instance: int) -> list[Outcome]:
        """One forward for the batch, or one per request if it fails; failures are then
        judged (the input's fault or the model's)."""
        outcomes = self._batch(batch, instance)
        if any(o.error is not None for o in outcomes):
            self._judge(outcomes, instance)
        return outcomes

    def _batch(self, batch: list[Pending], instance: int) -> list[Outcome]:
        rows = sum(p.rows for p in batch)
        if len(batch) > 1:
            pad = self.pad
            try:
                inputs = [
                    stack([p.inputs[i] for p in batch], None if pad is None else pad[i])
                    for i in range(len(batch[0].inputs))
                ]
            except ValueError:  # variable-shaped inputs that do not stack: run one by one
                return [self._one(p, instance) for p in batch]
        else:
            inputs = batch[0].inputs
        started = self.clock()
        try:
            outputs = self._forward(inputs, rows, instance)
        except Exception as exc:
            if len(batch) == 1:
                log.exception("forward failed", extra={"model": self.model.key, "rows": rows})
                return [Outcome(error=exc)]
            self.metrics.batch_retries.inc()
            log.warning(
                "batch forward failed, retrying its requests one by one",
                extra={"model": self.model.key, "rows": rows, "requests": len(batch)},
            )
            return [self._one(p, instance) for p in batch]
        compute_s = self.clock() - started
        self.metrics.compute.observe(compute_s)
        self.metrics.batch_size.observe(rows)
        if self.by_tokens:
            self._count_tokens(batch)
        if not self._batched:  # one request per forward, outputs without a batch dim
            return [Outcome(outputs, compute_s=compute_s)]
        top, probability = top_classes(outputs[0]) if self._scored else (None, None)
        results: list[Outcome] = []
        offset = 0
        for p in batch:
            end = offset + p.rows
            outcome = Outcome([o[offset:end] for o in outputs], compute_s=compute_s)
            if top is not None and probability is not None:
                outcome.top, outcome.top_probability = top[offset:end], probability[offset:end]
            results.append(outcome)
            offset = end
        return results

    def _one(self, pending: Pending, instance: int) -> Outcome:
        started = self.clock()
        try:
            outputs = self._forward(pending.inputs, pending.rows, instance)
        except Exception as exc:
            log.exception("forward failed", extra={"model": self.model.key, "rows": pending.rows})
            return Outcome(error=exc)
        compute_s = self.clock() - started
        self.metrics.compute.observe(compute_s)
        self.metrics.batch_size.observe(pending.rows)
        outcome = Outcome(outputs, compute_s=compute_s)
        if self._scored:
            outcome.top, outcome.top_probability = top_classes(outputs[0])
        return outcome

    def _count_tokens(self, batch: list[Pending]) -> None:
        real = sum(p.length for p in batch)
        padded = len(batch) * max(p.length for p in batch)
        self.tokens[0] += real
        self.tokens[1] += padded
        if self.metrics.tokens_real is not None and self.metrics.tokens_padded is not None:
            self.metrics.tokens_real.inc(real)
            self.metrics.tokens_padded.inc(padded)

    def _judge(self, outcomes: list[Outcome], instance: int) -> None:
        """Mark failures as the input's fault when the model still works: another request
        of the batch succeeded, or, when none did, a probe forward on the known-good input
        of the signature check succeeds. A failed probe leaves them the model's."""
        works = any(o.error is None for o in outcomes)
        if not works:
            probe = dummy_inputs(self.model.config, 1 if self._batched else 0)
            try:
                self._forward(probe, 1, instance)
                works = True
            except Exception:
                log.warning("probe on known-good input failed", extra={"model": self.model.key})
        if works:
            for outcome in outcomes:
                outcome.input_fault = outcome.error is not None

    def _forward(self, inputs: list[np.ndarray], rows: int, instance: int) -> list[np.ndarray]:
        outputs = self.model.forward(inputs, instance)
        if self._batched:
            for out in outputs:
                if out.ndim == 0 or out.shape[0] != rows:
                    raise RuntimeError(
                        f"model returned {out.shape[0] if out.ndim else 0} rows for {rows}"
                    )
        return outputs


def stack(parts: list[np.ndarray], pad: float | None) -> np.ndarray:
    """Rows of several requests as one batch; rows shorter than the longest padded with
    `pad` (at their end, in every dimension after the batch's) when one is given."""
    shapes = {p.shape[1:] for p in parts}
    if len(shapes) == 1 or pad is None:
        return np.concatenate(parts)
    if len({len(s) for s in shapes}) != 1:
        raise ValueError("rows of different ranks")
    longest = tuple(max(dims) for dims in zip(*shapes, strict=True))
    out = np.full((sum(p.shape[0] for p in parts), *longest), pad, dtype=parts[0].dtype)
    offset = 0
    for part in parts:
        region = (slice(offset, offset + part.shape[0]), *(slice(0, d) for d in part.shape[1:]))
        out[region] = part
        offset += part.shape[0]
    return out

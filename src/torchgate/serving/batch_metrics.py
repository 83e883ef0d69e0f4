"""`BatcherMetrics`: the metric children one batcher writes to, bound to its model and
version once when it starts (a `.labels()` lookup per batch would take a dict lookup and
a lock each time) and unbound when it stops. The metrics themselves are defined in
`metrics.py`."""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client import Counter, Gauge, Histogram

from torchgate.metrics import Metrics


@dataclass(slots=True)
class BatcherMetrics:
    batch_size: Histogram
    queue_rows: Gauge
    queue_wait: Histogram
    compute: Histogram
    shed_queue_full: Counter
    shed_deadline: Counter
    batch_retries: Counter
    tokens_real: Counter | None = None  # text models batched by tokens only
    tokens_padded: Counter | None = None
    padding_ratio: Gauge | None = None

    @classmethod
    def bind(
        cls, metrics: Metrics, model: str, version: str, *, tokens: bool = False
    ) -> BatcherMetrics:
        children = cls(
            batch_size=metrics.batch_size.labels(model, version),
            queue_rows=metrics.queue_rows.labels(model, version),
            queue_wait=metrics.queue_wait.labels(model, version),
            compute=metrics.compute.labels(model, version),
            shed_queue_full=metrics.shed.labels(model, "queue_full"),
            shed_deadline=metrics.shed.labels(model, "deadline"),
            batch_retries=metrics.batch_retries.labels(model, version),
        )
        if tokens:
            children.tokens_real = metrics.batch_tokens.labels(model, version, "real")
            children.tokens_padded = metrics.batch_tokens.labels(model, version, "padded")
            children.padding_ratio = metrics.padding_ratio.labels(model, version)
        return children

    def unbind(self) -> None:
        """Let a stopped batcher's gauges read nothing of it any more: a gauge read at
        scrape time holds a function of the batcher, which holds the gauge, a cycle that
        only a full collection would free (and with it the version's model)."""
        self.queue_rows.set_function(_nothing)
        if self.padding_ratio is not None:
            self.padding_ratio.set_function(_nothing)


def _nothing() -> float:
    return 0.0

"""Every Prometheus metric torchgate exposes, defined in one place on an injected registry.

Labels are bounded: `model` and `version` only ever take names of loaded models (requests
for anything else count under `_unknown`), `route` is a route template or `unmatched`.
"""

from __future__ import annotations

import contextlib
from functools import partial

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    PlatformCollector,
    ProcessCollector,
)

UNKNOWN = "_unknown"

PER_MODEL = ("model",)
PER_VERSION = ("model", "version")

# fmt: off
LATENCY_BUCKETS = (
    0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.025, 0.035, 0.05, 0.075, 0.1, 0.15, 0.25,
    0.35, 0.5, 0.75, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0,
)
FAST_BUCKETS = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
    2.5, 5.0, 10.0,
)
# fmt: on
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
LOAD_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


class Metrics:
    """All of torchgate's metrics, registered on `registry` (one per app)."""

    def __init__(self, registry: CollectorRegistry, *, version: str) -> None:
        self.registry = registry
        counter, gauge, histogram = (
            partial(kind, registry=registry) for kind in (Counter, Gauge, Histogram)
        )
        ProcessCollector(registry=registry)
        PlatformCollector(registry=registry)
        Info("torchgate_build", "torchgate build", registry=registry).info({"version": version})

        # the article's four
        self.requests = counter(
            "ai_requests_total", "Inference requests by model and HTTP status", ["model", "status"]
        )
        self.latency = histogram(
            "ai_request_latency_seconds",
            "Inference request latency, receipt to response",
            PER_MODEL,
            buckets=LATENCY_BUCKETS,
        )
        self.error_latency = histogram(
            "torchgate_error_latency_seconds",
            "Latency of the inference requests answered with an error (not 2xx): subtracted "
            "from ai_request_latency_seconds, the latency of those served",
            PER_MODEL,
            buckets=LATENCY_BUCKETS,
        )
        self.predictions = counter(
            "ai_predictions_total", "Predicted rows by model and top class", ["model", "class"]
        )
        self.load_bytes = gauge(
            "ai_model_load_bytes",
            "Parameter and buffer bytes of a loaded version",
            PER_VERSION,
        )

        # HTTP and capacity
        self.http_requests = counter(
            "torchgate_http_requests_total",
            "HTTP requests by route template and status",
            ["route", "method", "status"],
        )
        self.inflight = gauge("torchgate_inflight_requests", "HTTP requests being served now")
        self.models_loaded = gauge("torchgate_models_loaded", "Model versions loaded and serving")

        # batching
        self.batch_size = histogram(
            "torchgate_batch_size",
            "Rows per forward pass",
            PER_VERSION,
            buckets=BATCH_BUCKETS,
        )
        self.queue_rows = gauge(
            "torchgate_queue_rows", "Rows waiting in a batcher's queue", PER_VERSION
        )
        self.queue_wait = histogram(
            "torchgate_queue_wait_seconds",
            "Time from queueing to the start of its forward",
            PER_VERSION,
            buckets=FAST_BUCKETS,
        )
        self.compute = histogram(
            "torchgate_compute_seconds",
            "Duration of one forward pass",
            PER_VERSION,
            buckets=FAST_BUCKETS,
        )
        self.batch_retries = counter(
            "torchgate_batch_retries_total",
            "Batches whose forward failed and were retried request by request",
            PER_VERSION,
        )
        self.batch_tokens = counter(
            "torchgate_batch_tokens_total",
            "Tokens in text batches: real ones, and padded (rows x the batch's longest row)",
            ["model", "version", "kind"],
        )
        self.padding_ratio = gauge(
            "torchgate_padding_ratio",
            "Padded tokens over real tokens in a text model's batches so far (1.0: no padding)",
            PER_VERSION,
        )
        self.shed = counter(
            "torchgate_shed_total",
            "Requests refused or dropped to protect the server",
            ["model", "reason"],
        )

        # processors
        self.preprocess = histogram(
            "torchgate_preprocess_seconds",
            "Time to turn a request's images or texts into model inputs",
            PER_MODEL,
            buckets=FAST_BUCKETS,
        )
        self.preprocess_refusals = counter(
            "torchgate_preprocess_refusals_total",
            "Images and texts refused before the model, by reason",
            ["model", "reason"],
        )

        # cache and circuit breaker
        self.cache_requests = counter(
            "torchgate_cache_requests_total",
            "Cache lookups per row, by result (hit or miss)",
            ["model", "result"],
        )
        self.cache_entries = gauge(
            "torchgate_cache_entries", "Rows held in the in-process cache", PER_MODEL
        )
        self.cache_evictions = counter(
            "torchgate_cache_evictions_total",
            "Rows evicted from the in-process cache to make room",
            PER_MODEL,
        )
        self.cache_backend_errors = counter(
            "torchgate_cache_backend_errors_total", "Failed calls to the shared (Redis) cache tier"
        )
        self.circuit_state = gauge(
            "torchgate_circuit_state",
            "Circuit breaker state: 0 closed, 1 half-open, 2 open",
            PER_VERSION,
        )
        self.circuit_transitions = counter(
            "torchgate_circuit_transitions_total",
            "Circuit breaker transitions, by new state",
            ["model", "to"],
        )

        # model lifecycle: canary rollouts and input drift
        self.canary_weight = gauge(
            "torchgate_canary_weight",
            "Share of requests without a version sent to a canary version (1 once promoted)",
            PER_VERSION,
        )
        self.canary_decisions = counter(
            "torchgate_canary_decisions_total",
            "Canary rollout decisions: step, promote, rollback, manual",
            ["model", "decision"],
        )
        self.drift_score = gauge(
            "ai_model_drift_score",
            "Mean population stability index of recent inputs against the training reference",
            PER_MODEL,
        )

        # residency: models loaded on demand within the memory budget; `model` takes names
        # of the repository's model folders only
        self.model_loads = counter(
            "torchgate_model_loads_total",
            "Model loads by reason (startup, on_demand, admin) and result (ok, failed, no_room)",
            ["model", "reason", "result"],
        )
        self.model_load_seconds = histogram(
            "torchgate_model_load_seconds",
            "Time to load a model: making room, the gate and the warm-up",
            PER_MODEL,
            buckets=LOAD_BUCKETS,
        )
        self.model_evictions = counter(
            "torchgate_model_evictions_total",
            "Models evicted to make room for another, least recently used first",
            PER_MODEL,
        )
        self.model_load_waits = counter(
            "torchgate_model_load_waits_total",
            "Requests that waited for their model to be loaded",
            PER_MODEL,
        )
        self.resident_bytes = gauge(
            "torchgate_model_resident_bytes",
            "Bytes a loaded version holds: parameters, buffers and what its warm-up allocated",
            PER_VERSION,
        )
        self.memory_budget = gauge(
            "torchgate_model_memory_budget_bytes",
            "Memory budget for loaded models, per device (absent: no budget)",
            ["device"],
        )
        self.memory_resident = gauge(
            "torchgate_model_memory_resident_bytes",
            "Bytes held by loaded models and reserved by loads in progress, per device",
            ["device"],
        )
        self.memory_peak = gauge(
            "torchgate_model_memory_peak_bytes",
            "Highest torchgate_model_memory_resident_bytes since start, per device",
            ["device"],
        )

        # edge protection
        self.ratelimit_rejections = counter(
            "torchgate_ratelimit_rejections_total",
            "Requests refused with 429, by policy",
            ["policy"],
        )
        self.ratelimit_backend_errors = counter(
            "torchgate_ratelimit_backend_errors_total",
            "Failed calls to the shared rate-limit store (served with local counters)",
        )
        self.refused = counter(
            "torchgate_refused_requests_total",
            "Requests refused at the edge, by reason (auth, size, type, timeout)",
            ["reason"],
        )

    def forget_version(self, model: str, version: str) -> None:
        """Drop every series of an unloaded version, so none lingers at a stale value (an
        open circuit's alert would keep firing for a version that is gone)."""
        per_version = (self.batch_size, self.queue_rows, self.queue_wait, self.compute)
        per_version += (self.batch_retries, self.load_bytes, self.resident_bytes)
        per_version += (self.padding_ratio, self.circuit_state, self.canary_weight)
        for metric in per_version:
            with contextlib.suppress(KeyError):
                metric.remove(model, version)
        for kind in ("real", "padded"):
            with contextlib.suppress(KeyError):
                self.batch_tokens.remove(model, version, kind)

    def forget_canary(self, model: str, version: str) -> None:
        """Drop a finished or replaced rollout's weight series."""
        with contextlib.suppress(KeyError):
            self.canary_weight.remove(model, version)

    def forget_drift(self, model: str) -> None:
        """Drop an unloaded model's drift score."""
        with contextlib.suppress(KeyError):
            self.drift_score.remove(model)

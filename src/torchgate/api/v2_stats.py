"""Triton's model configuration and statistics extensions, in the JSON shapes that
`tritonclient` (`get_model_config`, `get_inference_statistics`) and `perf_analyzer` read.

The configuration is `model.toml` told in Triton's terms (`max_batch_size`, `input` and
`output` with `TYPE_*` datatypes and one row's `dims`, `dynamic_batching`,
`instance_group`, `response_cache`). The statistics come from what torchgate already
counts in its Prometheus registry, never from counters of their own:

- per version (the batcher's series): `execution_count` forwards and `inference_count`
  rows from `torchgate_batch_size`, `queue.ns` from `torchgate_queue_wait_seconds`, and
  `compute_infer.ns` from `torchgate_compute_seconds`: each forward's time counted once
  per request it served, taken as the forwards' total times the requests computed per
  forward (Triton times each request's share of its batch the same way);
- per model (the request series): `success` and `fail` from `ai_requests_total` (2xx,
  and every other status of a request for the model), their `ns` from
  `ai_request_latency_seconds` (whose sum covers both: split by count). A model with
  several versions has them spread over its versions in proportion to each version's
  queued requests (exact with one version, the usual case).

As in Triton, `queue.count` and the `compute_*` counts go with `success.count`: requests
answered whole from the cache (successes that reached no forward) count as `cache_hit`,
and only the others as computed. torchgate does not time input copies, output copies,
cache lookups or the last inference apart, so those read 0, and `batch_stats` is empty
(the batch-size histogram keeps buckets, not each size).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from prometheus_client.metrics import MetricWrapperBase

from torchgate.metrics import Metrics
from torchgate.serving.model_config import TensorSpec
from torchgate.serving.registry import ModelRegistry
from torchgate.serving.served import ServedModel, ServedVersion

PLATFORM = "pytorch_libtorch"
BACKEND = "pytorch"
_NS = 1_000_000_000


def triton_type(datatype: str) -> str:
    """A protocol datatype as Triton's config names it (BYTES is TYPE_STRING there)."""
    return "TYPE_STRING" if datatype == "BYTES" else f"TYPE_{datatype}"


def model_config(served: ServedModel, version: ServedVersion) -> dict[str, Any]:
    """A model's configuration as Triton's `GET /v2/models/{name}/config` answers it."""
    config = served.config
    options = version.batcher.options
    device = version.model.device

    def tensor(spec: TensorSpec, *, output: bool = False) -> dict[str, Any]:
        body: dict[str, Any] = {
            "name": spec.name,
            "data_type": triton_type(spec.datatype),
            "dims": list(spec.shape),
            "is_shape_tensor": False,
        }
        if output:
            body["label_filename"] = ""
        else:
            body |= {"format": "FORMAT_NONE", "allow_ragged_batch": False, "optional": False}
        return body

    body: dict[str, Any] = {
        "name": served.name,
        "platform": PLATFORM,
        "backend": BACKEND,
        "version_policy": {"all": {}},  # every N/model.pt folder is served
        "max_batch_size": config.max_batch_size,
        "input": [tensor(s) for s in config.inputs],
        "output": [tensor(s, output=True) for s in config.outputs],
        "instance_group": [
            {
                "name": f"{served.name}_0",
                "kind": "KIND_GPU" if device.type == "cuda" else "KIND_CPU",
                "count": options.instances,
                "gpus": [device.index or 0] if device.type == "cuda" else [],
            }
        ],
        "default_model_filename": "model.pt",
        "response_cache": {"enable": version.cache.enabled},
    }
    if config.batched:
        body["dynamic_batching"] = {
            "preferred_batch_size": [],
            "max_queue_delay_microseconds": round(options.max_delay_s * 1_000_000),
            "preserve_ordering": False,
            "default_queue_policy": {
                "timeout_action": "REJECT",
                "default_timeout_microseconds": round(options.timeout_s * 1_000_000),
                "allow_timeout_override": False,
                "max_queue_size": options.max_queue_rows,  # rows, where Triton counts requests
            },
        }
    return body


# statistics ---------------------------------------------------------------------------------


Values = dict[tuple[str, ...], float]


def _read(metric: MetricWrapperBase) -> Values:
    """Every sample of `metric`, keyed by its name's suffix and its label values."""
    values: Values = {}
    for family in metric.collect():
        for sample in family.samples:
            values[(sample.name[len(family.name) :], *sample.labels.values())] = sample.value
    return values


@dataclass(slots=True)
class _Version:
    """What the batcher of one version counted."""

    queued: int = 0  # requests that reached a forward
    queue_s: float = 0.0
    forwards: int = 0
    forward_s: float = 0.0
    rows: int = 0


@dataclass(slots=True)
class _Model:
    """What the edge counted of one model's requests."""

    success: int = 0
    fail: int = 0
    latency_s: float = 0.0
    answered: int = 0  # requests in the latency histogram (every status)
    hit_rows: int = 0
    versions: dict[str, _Version] = field(default_factory=dict)


class Statistics:
    """One reading of the metrics, answered per model version in Triton's shape."""

    def __init__(self, metrics: Metrics) -> None:
        self._models: dict[str, _Model] = {}
        for (suffix, model, status), value in _read(metrics.requests).items():
            if suffix == "_total":
                counts = self._model(model)
                if status.startswith("2"):
                    counts.success += int(value)
                else:
                    counts.fail += int(value)
        for (suffix, model, *_), value in _read(metrics.latency).items():
            if suffix == "_sum":
                self._model(model).latency_s += value
            elif suffix == "_count":
                self._model(model).answered += int(value)
        for (suffix, model, result), value in _read(metrics.cache_requests).items():
            if suffix == "_total" and result == "hit":
                self._model(model).hit_rows += int(value)
        for (suffix, model, version, *_), value in _read(metrics.queue_wait).items():
            if suffix == "_count":
                self._version(model, version).queued = int(value)
            elif suffix == "_sum":
                self._version(model, version).queue_s = value
        for (suffix, model, version, *_), value in _read(metrics.compute).items():
            if suffix == "_count":
                self._version(model, version).forwards = int(value)
            elif suffix == "_sum":
                self._version(model, version).forward_s = value
        for (suffix, model, version, *_), value in _read(metrics.batch_size).items():
            if suffix == "_sum":
                self._version(model, version).rows = int(value)

    def _model(self, name: str) -> _Model:
        return self._models.setdefault(name, _Model())

    def _version(self, name: str, version: str) -> _Version:
        return self._model(name).versions.setdefault(version, _Version())

    def model_stats(self, served: ServedModel, versions: Iterable[int]) -> list[dict[str, Any]]:
        """Triton's `model_stats` entries of `served`'s `versions`."""
        model = self._models.get(served.name, _Model())
        own = {v: model.versions.get(str(v), _Version()) for v in served.versions}
        weights = {v: float(counts.queued) for v, counts in own.items()}
        if not any(weights.values()):
            weights[served.default_version] = 1.0
        total = sum(weights.values())
        share = {v: w / total for v, w in weights.items()}
        success = _split(model.success, share)
        fail = _split(model.fail, share)
        hit_rows = _split(model.hit_rows, share)
        success_s = model.latency_s * model.success / model.answered if model.answered else 0.0
        fail_s = max(model.latency_s - success_s, 0.0)
        entries = []
        for v in versions:
            counts = own[v]
            computed = min(success[v], counts.queued)
            per_forward = computed / counts.forwards if counts.forwards else 0.0
            entries.append(
                {
                    "name": served.name,
                    "version": str(v),
                    "last_inference": 0,
                    "inference_count": counts.rows + hit_rows[v],
                    "execution_count": counts.forwards,
                    "inference_stats": {
                        "success": _stat(success[v], success_s * share[v]),
                        "fail": _stat(fail[v], fail_s * share[v]),
                        "queue": _stat(success[v], counts.queue_s),
                        "compute_input": _stat(computed),
                        "compute_infer": _stat(computed, counts.forward_s * per_forward),
                        "compute_output": _stat(computed),
                        "cache_hit": _stat(success[v] - computed),
                        "cache_miss": _stat(computed if served.versions[v].cache.enabled else 0),
                    },
                    "batch_stats": [],
                }
            )
        return entries


def statistics(
    registry: ModelRegistry, metrics: Metrics, name: str | None, version: str | None
) -> dict[str, Any]:
    """`{"model_stats": [...]}` for one version, one model's versions, or every model."""
    reading = Statistics(metrics)
    if name is None:
        entries = [
            entry
            for model in registry.names()
            for entry in reading.model_stats(registry.get(model), registry.get(model).versions)
        ]
        return {"model_stats": entries}
    served = registry.get(name)
    versions = served.versions if version is None else [registry.resolve(name, version).version]
    return {"model_stats": reading.model_stats(served, versions)}


def _split(total: int, shares: dict[int, float]) -> dict[int, int]:
    """`total` in whole parts by `shares` (largest remainder), adding up to `total`."""
    exact = {k: total * s for k, s in shares.items()}
    parts = {k: int(v) for k, v in exact.items()}
    left = total - sum(parts.values())
    for k in sorted(exact, key=lambda k: exact[k] - parts[k], reverse=True)[:left]:
        parts[k] += 1
    return parts


def _stat(count: int, seconds: float = 0.0) -> dict[str, int]:
    """Triton's duration statistic: a count and nanoseconds, both unsigned integers."""
    return {"count": count, "ns": max(round(seconds * _NS), 0)}

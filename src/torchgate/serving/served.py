"""`ServedVersion` and `ServedModel`: what the registry serves of a model, and how one
version is started (`start_version`: its batcher, breaker, cache namespace, preprocess
thread and concurrency limit) and stopped (`stop_version`); how a model is assembled from
what came through the gate (`assemble`), what a replaced one closes (`retire`), and what
one holds, for the residency (`resident`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

from torchgate.config import Settings
from torchgate.lifecycle.canary import Canary
from torchgate.lifecycle.drift import DriftMonitor
from torchgate.metrics import Metrics
from torchgate.serving.admission import Admission
from torchgate.serving.batch_metrics import BatcherMetrics
from torchgate.serving.batching import Batcher, BatcherOptions
from torchgate.serving.breaker import BreakerState, CircuitBreaker
from torchgate.serving.budget import Bytes
from torchgate.serving.cache import InferenceCache, VersionCache
from torchgate.serving.concurrency import ConcurrencyLimit
from torchgate.serving.footprint import device_key
from torchgate.serving.model import LoadedModel
from torchgate.serving.model_config import ModelConfig
from torchgate.serving.residents import Loaded
from torchgate.serving.runner import Runner

log = logging.getLogger("torchgate.registry")


@dataclass(slots=True)
class ServedVersion:
    """One version being served: the model, its batcher, cache namespace and breaker, and
    for a model with a preprocessor the thread that decodes its images and long texts."""

    model: LoadedModel
    batcher: Batcher
    cache: VersionCache
    breaker: CircuitBreaker
    drift: DriftMonitor | None = None  # the model's, shared by its versions
    # one thread, not a pool: more threads decoding at once take the GIL from the event
    # loop, and /health waits (README, Benchmark: the image cell)
    preprocess: Runner | None = None
    # requests of this version inside the server at once (admitted before their body is read)
    limit: ConcurrencyLimit = field(default_factory=lambda: ConcurrencyLimit(minimum=1, maximum=1))

    @property
    def name(self) -> str:
        return self.model.name

    @property
    def version(self) -> int:
        return self.model.version

    @property
    def config(self) -> ModelConfig:
        return self.model.config


@dataclass(slots=True)
class ServedModel:
    name: str
    config: ModelConfig
    versions: dict[int, ServedVersion]
    default_version: int  # the stable version while a canary rolls out
    canary: Canary | None = None
    drift: DriftMonitor | None = None
    refused: dict[int, str] = field(default_factory=dict)  # version -> why it is not served
    notes: list[str] = field(default_factory=list)  # what the last load had to say


def assemble(
    admission: Admission, old: ServedModel | None, start: Callable[[LoadedModel], ServedVersion]
) -> ServedModel:
    """A model as served from what came through the gate: versions served already (`old`)
    keep their batcher, breaker and cache; new ones are started by `start`."""
    versions: dict[int, ServedVersion] = {}
    for number, model in sorted(admission.folder.versions.items()):
        before = None if old is None else old.versions.get(number)
        unchanged = before is not None and before.model is model
        versions[number] = before if unchanged and before is not None else start(model)
    return ServedModel(
        admission.name,
        admission.folder.config,
        versions,
        admission.default,
        refused=dict(admission.refused),
        notes=list(admission.notes),
    )


def retire(old: ServedModel, new: ServedModel | None = None) -> None:
    """Close the canary and drift monitor of `old` that `new` (None: nothing) did not keep."""
    if old.canary is not None and (new is None or old.canary is not new.canary):
        old.canary.close()
    if old.drift is not None and (new is None or old.drift is not new.drift):
        old.drift.close()


def resident(served: ServedModel, settings: Settings) -> Loaded:
    """What a served model holds on each device, for the residency."""
    footprint: Bytes = {}
    for version in served.versions.values():
        device = device_key(version.model.device)
        footprint[device] = footprint.get(device, 0) + version.model.resident_bytes
    return Loaded(footprint, served.config.load, load_wait_s(served.config, settings))


def load_wait_s(config: ModelConfig, settings: Settings) -> float:
    """How long a request waits for the model's load: its queue deadline."""
    return (settings.batch_timeout_ms or config.batching.timeout_ms) / 1000


def start_version(
    model: LoadedModel, settings: Settings, metrics: Metrics, cache: InferenceCache
) -> ServedVersion:
    """A version's batcher (started), breaker, cache namespace, preprocess thread and
    concurrency limit, with its metric series."""
    batching = model.config.batching
    s = settings
    options = BatcherOptions(
        max_batch_size=model.config.max_batch_size,
        max_delay_s=(s.max_delay_ms if s.max_delay_ms is not None else batching.max_delay_ms)
        / 1000,
        max_queue_rows=s.max_queue_rows or batching.max_queue_rows,
        timeout_s=(s.batch_timeout_ms or batching.timeout_ms) / 1000,
        instances=batching.instances,
        pad=_pad_values(model),
        max_batch_tokens=batching.max_batch_tokens,
    )
    version = str(model.version)
    tokens = options.max_batch_tokens is not None
    batcher_metrics = BatcherMetrics.bind(metrics, model.name, version, tokens=tokens)
    batcher = Batcher(model, options, batcher_metrics)
    batcher.start()
    metrics.load_bytes.labels(model.name, version).set(model.load_bytes)
    metrics.resident_bytes.labels(model.name, version).set(model.resident_bytes)
    state_gauge = metrics.circuit_state.labels(model.name, version)
    state_gauge.set(BreakerState.CLOSED.value)

    def on_change(state: BreakerState) -> None:
        state_gauge.set(state.value)
        metrics.circuit_transitions.labels(model.name, state.name.lower()).inc()
        log.warning("circuit breaker", extra={"model": model.key, "state": state.name.lower()})

    breaker = CircuitBreaker(
        model.key,
        failures=s.breaker_failures,
        cooldown_s=s.breaker_cooldown_s,
        min_callers=s.breaker_min_callers,
        on_change=on_change,
    )
    preprocess = None
    if model.preprocessor is not None:
        preprocess = Runner(f"preprocess-{model.key}")
        preprocess.start()
    return ServedVersion(
        model,
        batcher,
        cache.for_version(model),
        breaker,
        preprocess=preprocess,
        limit=_concurrency(options),
    )


async def stop_version(
    version: ServedVersion, drain_timeout_s: float, metrics: Metrics, cache: InferenceCache
) -> None:
    """Let the version's queued requests finish, stop its batcher and preprocess thread, and
    drop its batcher's metric series and its cache entries."""
    await version.batcher.drain(drain_timeout_s)
    await version.batcher.aclose()
    version.batcher.metrics.unbind()
    if version.preprocess is not None:
        version.preprocess.stop()
    cache.drop(version.model)


def _concurrency(options: BatcherOptions) -> ConcurrencyLimit:
    """Between enough requests to fill the batches the runners compute, and what the queue
    holds besides them (rows, as most requests carry one)."""
    running = options.max_batch_size * options.instances if options.max_batch_size else 1
    maximum = options.max_queue_rows + running
    return ConcurrencyLimit(minimum=min(running, maximum), maximum=maximum)


def _pad_values(model: LoadedModel) -> tuple[float, ...] | None:
    pad = model.preprocessor.pad_values() if model.preprocessor is not None else None
    return None if pad is None else tuple(pad)

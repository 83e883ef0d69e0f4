"""`ModelRegistry`: the models being served now, each version with its own batcher.

The repository reads folders from disk; the registry owns what is live: it starts each
version's batcher, resolves a request's model and version (splitting requests that name
no version between the stable version and a canary), and stops them on unload. A reload
through the admin API holds new or changed versions to the accuracy gate first
(`serving.validation`); each model with a `reference.npz` gets a drift monitor.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from dataclasses import dataclass

from torchgate import memory
from torchgate.config import Settings
from torchgate.errors import ModelNotFound
from torchgate.metrics import Metrics
from torchgate.serving.batching import Batcher, BatcherOptions
from torchgate.serving.breaker import BreakerState, CircuitBreaker
from torchgate.serving.cache import InferenceCache, VersionCache
from torchgate.serving.canary import Canary, rollout
from torchgate.serving.drift import DriftMonitor, Reference
from torchgate.serving.model import LoadedModel
from torchgate.serving.model_config import MODEL_NAME, CanaryConfig, ModelConfig
from torchgate.serving.repository import ModelFolder, ModelRepository
from torchgate.serving.runner import Runner
from torchgate.serving.validation import screen

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


class ModelRegistry:
    """Live models by name; built in the app's lifespan."""

    def __init__(
        self,
        repository: ModelRepository,
        settings: Settings,
        metrics: Metrics,
        cache: InferenceCache,
    ) -> None:
        self.repository = repository
        self.settings = settings
        self.metrics = metrics
        self.cache = cache
        self._models: dict[str, ServedModel] = {}
        # one load or unload of a model at a time: two concurrent loads would each replace
        # what the other had started, and the superseded versions would never be stopped
        self._locks: dict[str, asyncio.Lock] = {}

    # what is served ----------------------------------------------------------------------

    def names(self) -> list[str]:
        return sorted(self._models)

    def __contains__(self, name: str) -> bool:
        return name in self._models

    def get(self, name: str) -> ServedModel:
        served = self._models.get(name)
        if served is None:
            shown = name if MODEL_NAME.match(name) and len(name) <= 64 else "(invalid name)"
            raise ModelNotFound(f"unknown model {shown}")
        return served

    def resolve(self, name: str, version: str | int | None = None) -> ServedVersion:
        """The version a request asked for, or the model's default one."""
        served = self.get(name)
        if version is None or version == "":
            return served.versions[served.default_version]
        number = version if isinstance(version, int) else _version_number(str(version))
        found = served.versions.get(number) if number is not None else None
        if found is None:
            shown = str(version) if str(version).isdigit() and len(str(version)) < 12 else "?"
            raise ModelNotFound(f"model {name} has no version {shown}")
        return found

    def route(
        self, name: str, version: str | None, identity: str
    ) -> tuple[ServedVersion, Canary | None]:
        """`resolve`, but a request without a version may go to the model's canary (by the
        caller's `identity`); the canary comes back when it did, to record the outcome."""
        if version:
            return self.resolve(name, version), None
        served = self.get(name)
        canary = served.canary
        if canary is None or not canary.routing:
            return served.versions[served.default_version], None
        number = canary.choose(identity)
        chosen = served.versions.get(number)
        if chosen is None:
            return served.versions[served.default_version], None
        return chosen, canary if number == canary.version else None

    def default_model(self) -> str:
        if self.settings.default_model:
            return self.settings.default_model
        if len(self._models) == 1:
            return next(iter(self._models))
        raise ModelNotFound(
            "several models are served and TORCHGATE_DEFAULT_MODEL is not set: "
            "use /v1/models/{name}:predict"
        )

    def versions(self) -> list[ServedVersion]:
        return [v for m in self._models.values() for v in m.versions.values()]

    def drift_monitors(self) -> list[DriftMonitor]:
        return [m.drift for m in self._models.values() if m.drift is not None]

    def open_circuits(self) -> list[str]:
        """Versions whose breaker is open now (refreshing each breaker's state)."""
        return [v.model.key for v in self.versions() if v.breaker.state is BreakerState.OPEN]

    # loading -----------------------------------------------------------------------------

    def add(self, folder: ModelFolder, reference: Reference | None = None) -> ServedModel:
        """Serve a loaded folder: start a batcher per version (inside the running loop).

        `reference` is the folder's drift reference when already read (otherwise it is
        read here); a running canary or drift window of the model is kept when unchanged."""
        old = self._models.get(folder.name)
        if reference is None:
            reference = Reference.read(self.repository.root / folder.name)
        versions = {n: self._serve(m) for n, m in sorted(folder.versions.items())}
        served = ServedModel(folder.name, folder.config, versions, folder.default_version)
        start = functools.partial(self._canary, folder.name)
        if old is None:
            served.canary = rollout(folder, None, {}, start)
            served.drift = DriftMonitor.serving(folder, reference, None, self.metrics)
        else:
            shas = {n: v.model.sha256 for n, v in old.versions.items()}
            served.canary = rollout(folder, old.canary, shas, start)
            served.drift = DriftMonitor.serving(folder, reference, old.drift, self.metrics)
        if served.canary is not None:
            served.default_version = served.canary.stable
        for version in versions.values():
            version.drift = served.drift
        if old is not None:
            if old.canary is not None and old.canary is not served.canary:
                old.canary.close()
            if old.drift is not None and old.drift is not served.drift:
                old.drift.close()
        self._models[folder.name] = served
        self.metrics.models_loaded.set(len(self.versions()))
        return served

    def _lock(self, name: str) -> asyncio.Lock:
        lock = self._locks.get(name)
        if lock is None:
            lock = self._locks[name] = asyncio.Lock()
        return lock

    async def load(self, name: str) -> ServedModel:
        """(Re)load a model from the repository without blocking the loop.

        New versions and versions whose file changed must pass the accuracy gate when the
        model has a validation.npz: one that fails is not served; when none is left (or
        the configured default failed) the load fails and what is served stays. Loads and
        unloads of one model run one at a time."""
        async with self._lock(name):
            return await self._load(name)

    async def _load(self, name: str) -> ServedModel:
        old = self._models.get(name)
        current = {} if old is None else {n: v.model for n, v in old.versions.items()}
        default = None if old is None else current[old.default_version]
        folder, reference = await asyncio.to_thread(self._read, name, current, default)
        served = self.add(folder, reference)
        if old is not None:
            await self._stop(old, keep=set(served.versions))
            del old, current, default  # the replaced versions' last references
            memory.release()
        return served

    async def unload(self, name: str) -> None:
        async with self._lock(name):
            await self._unload(name)

    async def _unload(self, name: str) -> None:
        served = self.get(name)
        del self._models[name]
        self.metrics.models_loaded.set(len(self.versions()))
        if served.canary is not None:
            served.canary.close()
        if served.drift is not None:
            served.drift.close()
        await self._stop(served)
        del served
        memory.release()

    def set_canary(self, name: str, weight: float, version: int | None = None) -> Canary:
        """An operator sets a model's canary weight (and version); starts one if none."""
        served = self.get(name)
        number = version if version is not None else getattr(served.canary, "version", None)
        if number is None:
            raise ValueError(f"model {name} has no canary: name a version")
        if number not in served.versions:
            raise ModelNotFound(f"model {name} has no version {number}")
        if number == served.default_version:
            raise ValueError(f"version {number} is the default version already; name another")
        if served.canary is None:
            policy = served.config.canary or CanaryConfig(version=number, weight=0)
            served.canary = self._canary(name, served.default_version, policy)
        served.canary.set(weight, number)
        return served.canary

    def _read(
        self, name: str, served: dict[int, LoadedModel], default: LoadedModel | None
    ) -> tuple[ModelFolder, Reference | None]:
        """Runs in a thread: load the folder, hold it to the gate, read its drift reference."""
        folder = self.repository.load(name)
        screen(folder, self.repository.root / name, served, default)
        return folder, Reference.read(self.repository.root / name)

    def _canary(self, name: str, stable: int, policy: CanaryConfig) -> Canary:
        def promoted(version: int) -> None:
            served = self._models.get(name)
            if served is not None and version in served.versions:
                served.default_version = version

        return Canary(name, stable, policy, metrics=self.metrics, on_promote=promoted)

    async def drain(self, timeout_s: float) -> bool:
        results = await asyncio.gather(*(v.batcher.drain(timeout_s) for v in self.versions()))
        return all(results)

    async def aclose(self) -> None:
        for served in list(self._models.values()):
            await self._stop(served, keep=set(served.versions))
        self._models.clear()

    def _serve(self, model: LoadedModel) -> ServedVersion:
        batching = model.config.batching
        s = self.settings
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
        metrics = self.metrics.for_batcher(model.name, version, tokens=tokens)
        batcher = Batcher(model, options, metrics)
        batcher.start()
        self.metrics.load_bytes.labels(model.name, version).set(model.load_bytes)
        state_gauge = self.metrics.circuit_state.labels(model.name, version)
        state_gauge.set(BreakerState.CLOSED.value)

        def on_change(state: BreakerState) -> None:
            state_gauge.set(state.value)
            self.metrics.circuit_transitions.labels(model.name, state.name.lower()).inc()
            log.warning("circuit breaker", extra={"model": model.key, "state": state.name.lower()})

        breaker = CircuitBreaker(
            model.key,
            failures=s.breaker_failures,
            cooldown_s=s.breaker_cooldown_s,
            min_callers=s.breaker_min_callers,
            on_change=on_change,
        )
        preprocess = None if model.preprocessor is None else Runner(f"preprocess-{model.key}")
        return ServedVersion(
            model, batcher, self.cache.for_version(model), breaker, preprocess=preprocess
        )

    async def _stop(
        self, served: ServedModel, *, keep: set[int] | frozenset[int] = frozenset()
    ) -> None:
        """Let queued requests finish, stop the batchers, drop metrics of versions not kept."""
        for version in served.versions.values():
            await version.batcher.drain(self.settings.drain_timeout_s)
            await version.batcher.aclose()
            if version.preprocess is not None:
                version.preprocess.stop()
            self.cache.drop(version.model)
            if version.version not in keep:
                self.metrics.forget_version(served.name, str(version.version))


def _pad_values(model: LoadedModel) -> tuple[float, ...] | None:
    pad = model.preprocessor.pad_values() if model.preprocessor is not None else None
    return None if pad is None else tuple(pad)


def _version_number(text: str) -> int | None:
    return int(text) if text.isdigit() and len(text) < 12 else None

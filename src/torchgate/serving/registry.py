"""`ModelRegistry`: the models being served now, each version with its own batcher.

The repository reads folders from disk and `admission` holds their versions to the gate;
the registry owns what is live: it starts each admitted version (`served`), resolves a
request's model and version (`router`: one that names no version may go to a canary), and
stops them on unload; a reload keeps the versions that did not change. Rollout decisions
are recorded (`rollout_state`), taken back at start-up and on reload, and followed across
replicas. Each model with a `reference.npz` gets a drift monitor. Which models are loaded
at all, within the memory budget, is its `residency`'s to say: the registry loads
(`admit`) and removes (`remove`) models when asked, and says what a model holds and
whether it is busy.
"""

from __future__ import annotations

import asyncio
import logging
import weakref
from collections import defaultdict
from collections.abc import Iterable

from torchgate import memory
from torchgate.config import Settings
from torchgate.errors import ModelLoadError, ModelNotFound
from torchgate.lifecycle.arm import Arm
from torchgate.lifecycle.canary import Canary
from torchgate.lifecycle.drift import DriftMonitor, Reference
from torchgate.lifecycle.gate import AdmissionRefused, describe
from torchgate.lifecycle.rollout_state import RolloutRecord, RolloutState
from torchgate.lifecycle.rollouts import Rollouts
from torchgate.metrics import Metrics
from torchgate.serving import router
from torchgate.serving.admission import Admission, admit
from torchgate.serving.breaker import BreakerState
from torchgate.serving.budget import Bytes, Limits
from torchgate.serving.cache import InferenceCache
from torchgate.serving.model import LoadedModel
from torchgate.serving.model_config import requestable_name
from torchgate.serving.repository import ModelRepository
from torchgate.serving.residency import Residency
from torchgate.serving.residents import ON_DEMAND, Loaded, LoadFailed
from torchgate.serving.served import (
    ServedModel,
    ServedVersion,
    assemble,
    load_wait_s,
    resident,
    retire,
    start_version,
    stop_version,
)

log = logging.getLogger("torchgate.registry")


class ModelRegistry:
    """Live models by name; built in the app's lifespan."""

    def __init__(
        self,
        repository: ModelRepository,
        settings: Settings,
        metrics: Metrics,
        cache: InferenceCache,
        state: RolloutState,
    ) -> None:
        self.repository = repository
        self.settings = settings
        self.metrics = metrics
        self.cache = cache
        self._models: dict[str, ServedModel] = {}
        self.rollouts = Rollouts(state, metrics, self._models.get, self.names)
        # one load or unload of a model at a time: two concurrent loads would each replace
        # what the other had started, and the superseded versions would never be stopped
        self._locks: defaultdict[str, asyncio.Lock] = defaultdict(asyncio.Lock)  # one per model
        self.residency = Residency(
            self,
            metrics,
            Limits(settings.model_memory_bytes, settings.gpu_model_memory_bytes),
            backoff_s=settings.load_backoff_s,
            backoff_max_s=settings.load_backoff_max_s,
            concurrent_loads=settings.concurrent_loads,
        )

    # what is served ----------------------------------------------------------------------

    def names(self) -> list[str]:
        return sorted(self._models)

    def __contains__(self, name: str) -> bool:
        return name in self._models

    def get(self, name: str) -> ServedModel:
        served = self._models.get(name)
        if served is None:
            shown = name if requestable_name(name) else "(invalid name)"
            raise ModelNotFound(f"unknown model {shown}")
        return served

    def resolve(self, name: str, version: str | int | None = None) -> ServedVersion:
        """The version a request asked for, or the model's default one (`router`)."""
        return router.resolve(self.get(name), version)

    def route(
        self, name: str, version: str | None, identity: str
    ) -> tuple[ServedVersion, Arm | None]:
        """`resolve`, or for a request without a version a side of the model's canary
        split, with where to record its outcome (`router`)."""
        if version:
            return self.resolve(name, version), None
        return router.route(self.get(name), identity)

    def default_model(self) -> str:
        """The model behind `POST /predict` (`router`)."""
        known = set(self._models) | set(self.residency.names())
        return router.default_model(self.settings.default_model, known)

    def versions(self) -> list[ServedVersion]:
        return [v for m in self._models.values() for v in m.versions.values()]

    def drift_monitors(self) -> list[DriftMonitor]:
        return [m.drift for m in self._models.values() if m.drift is not None]

    def open_circuits(self) -> list[str]:
        """Versions whose breaker is open now (refreshing each breaker's state)."""
        return [v.model.key for v in self.versions() if v.breaker.state is BreakerState.OPEN]

    # loading -----------------------------------------------------------------------------

    def start(self) -> None:
        """Take stock of the start-up set (it must fit the memory budget: otherwise
        `ModelLoadError`), learn every other model of the repository and how it asks to be
        loaded, and follow the decisions other replicas store (when the store is shared)."""
        for name, served in self._models.items():
            self.residency.installed(name, resident(served, self.settings))
        problems = self.residency.budget.problems()
        if problems:
            raise ModelLoadError(self.repository.root, problems[0])
        for name in self.repository.names():
            if name in self._models:
                continue
            try:
                config = self.repository.read_config(name)
            except ModelLoadError as exc:  # changed since start-up's admission: tried on demand
                why = f"load failed: {describe(exc, self.repository.root)}"
                self.residency.know(name, ON_DEMAND, 10.0, why)
                continue
            # a model.toml that says startup or pinned now but was not admitted at start-up
            # (it changed meanwhile) loads on demand: waiting for it would keep the pod
            # unready with nothing to load it
            self.residency.know(name, ON_DEMAND, load_wait_s(config, self.settings))
        self.rollouts.start()

    # what the residency asks of the table --------------------------------------------------

    async def estimate(self, name: str) -> Bytes:
        try:
            return await asyncio.to_thread(self.repository.estimate, name)
        except ModelLoadError as exc:
            raise LoadFailed(describe(exc, self.repository.root)) from None

    async def admit(self, name: str) -> Loaded:
        """Load a model through the gate and serve it (`load`, without the budget)."""
        try:
            async with self._locks[name]:
                served = await self._load(name)
        except ModelLoadError as exc:
            raise LoadFailed(describe(exc, self.repository.root)) from None
        return resident(served, self.settings)

    async def remove(self, name: str) -> None:
        """Stop serving a model and release its memory (`unload`, without the budget)."""
        async with self._locks[name]:
            await self._unload(name)

    def busy(self, name: str) -> bool:
        served = self._models.get(name)
        return served is not None and not all(v.batcher.idle for v in served.versions.values())

    def install(self, admission: Admission, reference: Reference | None = None) -> ServedModel:
        """Serve what came through the gate (inside the running loop): versions that were
        served already keep their batcher, breaker and cache; new ones get their own.

        `reference` is the model's drift reference when already read (otherwise it is read
        here); a running canary or drift window of the model is kept when unchanged."""
        name = admission.name
        old = self._models.get(name)
        if reference is None:
            reference = Reference.read(self.repository.root / name)
        served = assemble(
            admission, old, lambda m: start_version(m, self.settings, self.metrics, self.cache)
        )
        served.canary = self.rollouts.canary_for(served, admission, old)
        previous_drift = None if old is None else old.drift
        served.drift = DriftMonitor.serving(
            admission.folder, reference, previous_drift, self.metrics
        )
        for version in served.versions.values():
            version.drift = served.drift
        if old is not None:
            retire(old, served)
        self._models[name] = served
        self.metrics.models_loaded.set(len(self.versions()))
        return served

    async def load(self, name: str) -> ServedModel:
        """(Re)load a model from the repository through the gate (`admission`), within the
        memory budget, without blocking the loop: unchanged versions stay as they are, new
        and changed ones are judged, and those that fail are not served (`refused`). When
        nothing can serve the load fails (`LoadFailed`) and what is served stays; when the
        budget has no room, `NoRoom`. Loads and unloads of one model run one at a time."""
        await self.residency.load(name)
        return self.get(name)

    async def _load(self, name: str) -> ServedModel:
        old = self._models.get(name)
        record = await self.rollouts.recall(name)
        current = {} if old is None else {n: v.model for n, v in old.versions.items()}
        serving = None if old is None else current[old.default_version]
        try:
            admission, reference = await asyncio.to_thread(
                self._admit, name, record, current, serving
            )
        except AdmissionRefused as exc:
            if old is not None:
                old.refused = {n: r for n, r in exc.refused.items() if n not in old.versions}
            raise
        served = self.install(admission, reference)
        if old is not None:
            still = {id(v) for v in served.versions.values()}
            await self._stop(name, [v for v in old.versions.values() if id(v) not in still])
            del old, current, serving  # the replaced versions' last references
            memory.release()
        self.rollouts.follow(name, record)
        return served

    def _admit(
        self,
        name: str,
        record: RolloutRecord | None,
        current: dict[int, LoadedModel],
        serving: LoadedModel | None,
    ) -> tuple[Admission, Reference | None]:
        """Runs in a thread: the gate, then the model's drift reference."""
        try:
            admission = admit(
                self.repository, name, record=record, current=current, serving=serving
            )
        finally:
            memory.trim()  # what the load read and decoded on the way goes back to the OS
        return admission, Reference.read(self.repository.root / name)

    async def unload(self, name: str) -> None:
        """An operator unloads a model: not served (404) until an operator loads it."""
        await self.residency.unload(name)

    async def _unload(self, name: str) -> None:
        served = self.get(name)
        del self._models[name]
        self.metrics.models_loaded.set(len(self.versions()))
        retire(served)
        watched = [weakref.ref(m) for v in served.versions.values() for m in v.model.modules]
        await self._stop(name, list(served.versions.values()))
        del served
        if not memory.release(watched):
            log.info(
                "an unloaded model is still referenced: freed when the last request using it ends",
                extra={"model": name},
            )

    async def drain(self, timeout_s: float) -> bool:
        results = await asyncio.gather(*(v.batcher.drain(timeout_s) for v in self.versions()))
        return all(results)

    def set_canary(self, name: str, weight: float, version: int | None = None) -> Canary:
        """An operator sets a model's canary weight (and version); starts one if none."""
        return self.rollouts.set(self.get(name), weight, version)

    async def aclose(self) -> None:
        await self.residency.aclose()
        for served in list(self._models.values()):
            await self._stop(served.name, list(served.versions.values()), forget=False)
        self._models.clear()
        await self.rollouts.aclose()

    async def _stop(
        self, name: str, versions: Iterable[ServedVersion], *, forget: bool = True
    ) -> None:
        """Let queued requests finish, stop the batchers, drop their cache entries and
        (`forget`) every metric series of theirs."""
        for version in versions:
            await stop_version(version, self.settings.drain_timeout_s, self.metrics, self.cache)
            now = self._models.get(name)
            # a version reloaded from a changed file keeps its number, and its series
            if forget and (now is None or version.version not in now.versions):
                self.metrics.forget_version(name, str(version.version))

"""`Residency`: which models are loaded, within the memory budget.

Each model's `load` policy (`model.toml`) says when it is loaded: `startup` and `pinned`
at start-up, `on_demand` on its first request. A request for a model that is not loaded
starts its load and waits for it within the model's queue deadline; however many requests
arrive meanwhile, the model is loaded once (single flight). A load goes through the
registry, so through the same gate as at start-up (`admission`: SHA-256 pin, signature,
accuracy gate, warm-up), in a thread. A load that fails answers 503 with the reason to
every request waiting for it, and the next try waits for a back-off that doubles with
each failure in a row.

A load reserves its estimate in the `MemoryBudget` (the size measured at its last load,
or its files) before it starts, evicting the least recently used models to make room
(`evictor`). Never evicted: a pinned model, a model being loaded, a model whose batchers
have requests queued or running, and a model a request is using: each request holds the
model it resolved (`acquire`, `holds`) until its task ends, so nothing it decoded or
queued is ever answered by a model that is gone. Past the deadline without room, the
request gets 503 with `Retry-After`, never an out-of-memory crash.

Models are loaded and evicted whole: the gate judges a model's versions against each
other (the default against the version before it), so they come and go together.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Callable

from torchgate.errors import ModelNotReady
from torchgate.metrics import Metrics
from torchgate.serving.budget import Limits, MemoryBudget
from torchgate.serving.evictor import Evictor
from torchgate.serving.holds import Holds
from torchgate.serving.residents import (
    ADMIN,
    ON_DEMAND,
    PINNED,
    STARTUP,
    Known,
    Loaded,
    LoadFailed,
    NoRoom,
    State,
    Status,
    Table,
    no_room,
)

log = logging.getLogger("torchgate.residency")


class Residency:
    """The resident set of one server: built by the registry, driven by requests."""

    def __init__(
        self,
        table: Table,
        metrics: Metrics,
        limits: Limits,
        *,
        clock: Callable[[], float] = time.monotonic,  # for the back-off
        backoff_s: float = 10.0,
        backoff_max_s: float = 300.0,
        concurrent_loads: int = 1,
    ) -> None:
        self.budget = MemoryBudget(limits, metrics)
        # a load takes several times its model's size while it runs (the file read whole,
        # the archive's reader, the tensors made from them) and the budget counts the
        # model once: loads take turns, so that only one such peak is ever on top of it
        self._turns = asyncio.Semaphore(concurrent_loads)
        self._table = table
        self._metrics = metrics
        self._clock = clock
        self._backoff_s = backoff_s
        self._backoff_max_s = backoff_max_s
        self._known: dict[str, Known] = {}
        self._loads: dict[str, asyncio.Task[None]] = {}
        self._room = Evictor(self.budget, table, metrics, self._known, self._evictable)
        self._holds = Holds(on_let_go=self._room.notify)

    # the catalogue -------------------------------------------------------------------------

    def know(self, name: str, policy: str, wait_s: float, why: str | None = None) -> None:
        """A model of the repository and how it asks to be loaded."""
        known = self._known.get(name)
        if known is None:
            known = self._known[name] = Known(policy, wait_s)
        known.policy, known.wait_s = policy, wait_s
        if why is not None:
            known.why = why

    def installed(self, name: str, loaded: Loaded) -> None:
        """A model the registry serves already (the start-up set): now resident."""
        self.know(name, loaded.policy, loaded.wait_s)
        self._settle(name, loaded)
        self._metrics.model_loads.labels(name, STARTUP, "ok").inc()

    def names(self) -> list[str]:
        return sorted(self._known)

    def status(self, name: str) -> Status | None:
        """Where a known model stands (None: not a model this server knows)."""
        known = self._known.get(name)
        if known is None:
            return None
        held = self.budget.footprint(name)
        if held is not None:
            return Status(State.LOADED, known.policy, footprint=held)
        if name in self._loads:
            return Status(State.LOADING, known.policy)
        reason = known.why
        left = known.retry_at - self._clock()
        if known.failures and left > 0:
            reason = f"{reason}; next try in {left:.0f} s"
        return Status(State.UNLOADED, known.policy, reason)

    def unready(self) -> list[str]:
        """Why the server is not ready as far as models go: a pinned model not loaded, or a
        start-up model never loaded (an evicted one makes no pod unready)."""
        problems = []
        for name, known in sorted(self._known.items()):
            if name in self.budget:
                continue
            if known.policy == PINNED or (known.policy == STARTUP and not known.loaded_once):
                problems.append(f"{known.policy} model {name} is not loaded")
        return problems

    # requests ------------------------------------------------------------------------------

    async def acquire(self, name: str) -> None:
        """Make a known model resident (loading it first if need be, within its deadline)
        and hold it for the calling task, so that it is not evicted while the request is
        being served. A name this server does not know is left to the registry (404)."""
        known = self._known.get(name)
        if known is None:
            return
        if self.budget.limits.bounded:  # (unbounded, nothing is ever evicted)
            self._holds.hold(name)  # even before it is loaded: it stays until this request ran
        if self.budget.use(name):
            return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + known.wait_s
        waited = False
        while name not in self.budget:
            task = self._loads.get(name) or self._start_load(name, known, ON_DEMAND)
            if not waited:
                self._metrics.model_load_waits.labels(name).inc()
                waited = True
            left = deadline - loop.time()
            done = (await asyncio.wait({task}, timeout=left))[0] if left > 0 else set()
            if not done:
                if name in self._room.waiting:
                    raise ModelNotReady(no_room(name, self._room.waiting[name]), retry_after_s=1)
                raise ModelNotReady(
                    f"model {name} is still loading: waited {known.wait_s:g} s", retry_after_s=1
                )
            self._raise_refusal(name, known, task)
        self.budget.use(name)

    def _raise_refusal(self, name: str, known: Known, task: asyncio.Task[None]) -> None:
        """A waiter's own error for a load that failed (one exception object per request)."""
        if task.cancelled():
            raise ModelNotReady(f"model {name} was not loaded: the server is stopping")
        exc = task.exception()
        if exc is None:
            return
        retry_after = max(known.retry_at - self._clock(), 1.0)
        if isinstance(exc, NoRoom):
            raise ModelNotReady(str(exc), retry_after_s=retry_after)
        raise ModelNotReady(f"model {name} could not be loaded: {exc}", retry_after_s=retry_after)

    # operators ---------------------------------------------------------------------------

    async def load(self, name: str) -> None:
        """An operator loads (or reloads) a model now, within the budget, whatever its
        back-off; raises `LoadFailed` or `NoRoom` when it cannot."""
        running = self._loads.get(name)
        if running is not None:
            await asyncio.wait({running})
        fresh = name not in self._known
        known = self._known.setdefault(name, Known(ON_DEMAND, 10.0))
        known.failures, known.retry_at = 0, 0.0
        task = self._start_load(name, known, ADMIN)
        await asyncio.wait({task})
        if fresh and task.exception() is not None:
            del self._known[name]  # still not a model this server knows: 404s stay 404s
        task.result()

    async def unload(self, name: str) -> None:
        """An operator unloads a model: it is not loaded again until an operator loads it
        (requests for it get 404, as for any model not served)."""
        running = self._loads.get(name)
        if running is not None:
            await asyncio.wait({running})
        known = self._known.pop(name, None)
        if name not in self.budget and known is not None:
            return  # known, not loaded: now not known either
        self.budget.evicting(name)  # (not known at all: the registry's 404)
        try:
            await self._table.remove(name)
        finally:
            self.budget.freed(name)
            self._room.notify()

    async def aclose(self) -> None:
        """Stop loads in progress (their threads finish on their own); let evictions under
        way finish (they take no longer than stopping an idle batcher)."""
        loads = list(self._loads.values())
        for task in loads:
            task.cancel()
        await asyncio.gather(*loads, *self._room.evictions.values(), return_exceptions=True)

    # loading -----------------------------------------------------------------------------

    def _start_load(self, name: str, known: Known, reason: str) -> asyncio.Task[None]:
        left = known.retry_at - self._clock()
        if known.failures and left > 0:
            raise ModelNotReady(
                f"model {name} could not be loaded: {known.error}; next try in {left:.0f} s",
                retry_after_s=left,
            )
        task = asyncio.create_task(self._load(name, known, reason), name=f"load-{name}")
        self._loads[name] = task
        task.add_done_callback(functools.partial(self._load_done, name))
        return task

    def _load_done(self, name: str, task: asyncio.Task[None]) -> None:
        if self._loads.get(name) is task:
            del self._loads[name]
        if not task.cancelled():
            task.exception()  # seen here: each waiter raises its own error from it
        self._room.notify()

    async def _load(self, name: str, known: Known, reason: str) -> None:
        loop = asyncio.get_running_loop()
        started = loop.time()
        try:
            async with self._turns:
                estimate = await self._table.estimate(name)
                held = self.budget.footprint(name)
                if held is not None:
                    # a reload keeps the versions that did not change: it needs room for
                    # what it adds (a new version, typically), counted from its files
                    estimate = {d: max(v - held.get(d, 0), 0) for d, v in estimate.items()}
                else:
                    for device, size in known.footprint.items():  # measured last time
                        estimate[device] = max(estimate.get(device, 0), size)
                await self._room.make_room(name, estimate, started + known.wait_s)
                try:
                    loaded = await self._table.admit(name)
                finally:
                    self.budget.unreserve(name)
        except NoRoom as exc:
            self._metrics.model_loads.labels(name, reason, "no_room").inc()
            log.warning("no room to load the model", extra={"model": name, "error": str(exc)})
            raise
        except LoadFailed as exc:
            self._failed(name, known, reason, str(exc))
            raise
        except Exception as exc:  # a bug or an unforeseen failure: answered as a failed load
            log.exception("model load failed unexpectedly", extra={"model": name})
            self._failed(name, known, reason, f"{type(exc).__name__}: {exc}")
            raise LoadFailed(str(exc)) from None
        self._settle(name, loaded)
        known.failures, known.retry_at = 0, 0.0
        await self._room.fit(name, loaded.footprint, reason)
        seconds = loop.time() - started
        self._metrics.model_loads.labels(name, reason, "ok").inc()
        self._metrics.model_load_seconds.labels(name).observe(seconds)
        log.info(
            "load finished",
            extra={
                "model": name,
                "reason": reason,
                "seconds": round(seconds, 3),
                "bytes": sum(loaded.footprint.values()),
            },
        )

    def _settle(self, name: str, loaded: Loaded) -> None:
        self._known[name].settle(loaded)
        self.budget.loaded(name, loaded.footprint)

    def _failed(self, name: str, known: Known, reason: str, why: str) -> None:
        backoff = known.failed(why, self._clock(), self._backoff_s, self._backoff_max_s)
        self._metrics.model_loads.labels(name, reason, "failed").inc()
        log.warning(
            "model load failed",
            extra={"model": name, "reason": reason, "error": why, "retry_in_s": backoff},
        )

    def _evictable(self, name: str) -> bool:
        known = self._known.get(name)
        if known is None or known.policy == PINNED or name in self._loads:
            return False
        return not self._holds.held(name) and not self._table.busy(name)

"""`Evictor`: makes room in the memory budget for a load.

To make room, the least recently used models that may go are evicted (unloaded, their
memory released and their cache entries dropped: `Table.remove`); what may go is the
residency's to say (`evictable`: not pinned, not loading, not in use, not busy). When
nothing can go, a load waits, within its deadline, for a model to be let go
(`notify` wakes it); past it, `NoRoom`. A model measured larger than its estimate once
loaded makes room the same way, or is unloaded again (`fit`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Mapping

from torchgate.metrics import Metrics
from torchgate.serving.budget import Bytes, MemoryBudget
from torchgate.serving.residents import PINNED, Known, NoRoom, Table, no_room

log = logging.getLogger("torchgate.residency")

POLL_S = 0.25  # a load waiting for room looks again at least this often


class Evictor:
    """The evictions of one residency, and the loads waiting for room."""

    def __init__(
        self,
        budget: MemoryBudget,
        table: Table,
        metrics: Metrics,
        known: dict[str, Known],
        evictable: Callable[[str], bool],
    ) -> None:
        self.budget = budget
        self._table = table
        self._metrics = metrics
        self._known = known  # the residency's own catalogue, shared
        self._evictable = evictable
        self.evictions: dict[str, asyncio.Task[None]] = {}
        self.waiting: dict[str, Bytes] = {}  # loads waiting for a model to be let go
        self._changed = asyncio.Event()

    async def make_room(self, name: str, need: Bytes, deadline: float) -> None:
        """Reserve `need` for a load: evict what it takes, wait (until `deadline`) while
        what could make room is in use, and return once it fits."""
        try:
            while over := self.budget.over(need):
                if await self.evict_for(name, over):
                    continue
                never = self.budget.never_fits(name, need, self.pinned)
                if never is not None:
                    raise NoRoom(never)
                left = deadline - asyncio.get_running_loop().time()
                if left <= 0:
                    raise NoRoom(no_room(name, need))
                self.waiting[name] = need
                await self.wait_change(min(left, POLL_S))
        finally:
            self.waiting.pop(name, None)
        self.budget.reserve(name, need)

    async def fit(self, name: str, footprint: Bytes, reason: str) -> None:
        """A loaded model measured larger than its estimate: make room, or unload it."""
        while over := self.budget.over({}):
            if await self.evict_for(name, over):
                continue
            log.warning(
                "the model is larger than its estimate and nothing can make room: unloaded",
                extra={"model": name, "bytes": sum(footprint.values())},
            )
            self.evict(name, counted=False)
            await asyncio.wait({self.evictions[name]})
            self._known[name].why = "did not fit the memory budget at its last load"
            self._metrics.model_loads.labels(name, reason, "no_room").inc()
            raise NoRoom(no_room(name, footprint))

    async def evict_for(self, name: str, over: Mapping[str, int]) -> bool:
        """Evict what covers `over` and wait until its memory is released: first what is
        being evicted already. Whether anything was (or is being) evicted."""
        if not self.evictions:
            victims = self.budget.victims(over, self._evictable, exclude=name)
            for victim in victims or ():
                self.evict(victim)
        if not self.evictions:
            return False
        await asyncio.wait(list(self.evictions.values()))
        return True

    def pinned(self, name: str) -> bool:
        known = self._known.get(name)
        return known is not None and known.policy == PINNED

    def evict(self, name: str, *, counted: bool = True) -> None:
        held = self.budget.evicting(name)
        self.evictions[name] = asyncio.create_task(
            self._remove(name, held, counted), name=f"evict-{name}"
        )

    async def _remove(self, name: str, held: Bytes, counted: bool) -> None:
        try:
            await self._table.remove(name)
        except Exception:  # out of the table whatever failed after: it is gone
            log.exception("evicting the model failed", extra={"model": name})
        finally:
            self.budget.freed(name)
            self.evictions.pop(name, None)
            known = self._known.get(name)
            if counted:
                if known is not None:
                    known.why = "evicted to make room (least recently used)"
                self._metrics.model_evictions.labels(name).inc()
                log.info("model evicted", extra={"model": name, "bytes": sum(held.values())})
            self.notify()

    def notify(self) -> None:
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    async def wait_change(self, timeout_s: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._changed.wait(), timeout_s)

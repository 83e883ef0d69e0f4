"""`MemoryBudget`: the bytes models hold on each device, against what they may hold.

Models count against the budget of the device they are on: host memory for the CPU
(`TORCHGATE_MODEL_MEMORY_BYTES`), the same amount for each GPU
(`TORCHGATE_GPU_MODEL_MEMORY_BYTES`). Held are the loaded models (their measured
`footprint`, in least-recently-used order), what each load in progress reserved (its
estimate), and models being evicted until their memory is released. So a load reserves
room only when everything still in memory leaves it, and what is held never exceeds the
budget. The budget says how far a load would go over, which models would cover that
(least recently used first, among those the caller may evict), and keeps the memory
gauges (held, peak, budget) per device.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

from torchgate.metrics import Metrics

Bytes = dict[str, int]  # by device: "cpu", "cuda:0", ...


@dataclass(frozen=True, slots=True)
class Limits:
    """Bytes models may hold on the CPU (`host`) and on each GPU (`gpu`); None: no limit."""

    host: int | None = None
    gpu: int | None = None

    def limit(self, device: str) -> int | None:
        if device == "cpu":
            return self.host
        return self.gpu if device.startswith("cuda") else None

    @property
    def bounded(self) -> bool:
        return self.host is not None or self.gpu is not None


class MemoryBudget:
    """What the models of one server hold, by device."""

    def __init__(self, limits: Limits, metrics: Metrics) -> None:
        self.limits = limits
        self._metrics = metrics
        self._resident: OrderedDict[str, Bytes] = OrderedDict()  # least recently used first
        self._reserved: dict[str, Bytes] = {}
        self._evicting: dict[str, Bytes] = {}
        self._peak: Bytes = {}
        if limits.host is not None:
            metrics.memory_budget.labels("cpu").set(limits.host)

    # the resident set ----------------------------------------------------------------------

    def __contains__(self, name: str) -> bool:
        return name in self._resident

    def resident(self) -> list[str]:
        """The loaded models, least recently used first."""
        return list(self._resident)

    def footprint(self, name: str) -> Bytes | None:
        held = self._resident.get(name)
        return None if held is None else dict(held)

    def use(self, name: str) -> bool:
        """Mark a model used now (most recently); whether it is loaded."""
        if name not in self._resident:
            return False
        self._resident.move_to_end(name)
        return True

    def loaded(self, name: str, footprint: Mapping[str, int]) -> None:
        """A model is loaded (or reloaded) and holds `footprint`; its reservation ends."""
        self._reserved.pop(name, None)
        self._resident[name] = dict(footprint)
        self._resident.move_to_end(name)
        self._update()

    def reserve(self, name: str, need: Mapping[str, int]) -> None:
        self._reserved[name] = dict(need)
        self._update()

    def unreserve(self, name: str) -> None:
        if self._reserved.pop(name, None) is not None:
            self._update()

    def reserved(self, name: str) -> bool:
        return name in self._reserved

    def evicting(self, name: str) -> Bytes:
        """A model leaves the resident set; it counts until `freed`. Returns its bytes."""
        held = self._resident.pop(name, {})
        self._evicting[name] = held
        return held

    def freed(self, name: str) -> None:
        """An evicted or unloaded model's memory is released."""
        self._evicting.pop(name, None)
        self._update()

    # how much, and what to evict -----------------------------------------------------------

    def held(self) -> Bytes:
        """Bytes per device: loaded models, loads in progress, evictions under way."""
        total: Bytes = {}
        parts: Iterable[Mapping[str, int]] = (
            *self._resident.values(),
            *self._reserved.values(),
            *self._evicting.values(),
        )
        for held in parts:
            for device, size in held.items():
                total[device] = total.get(device, 0) + size
        return total

    def over(self, need: Mapping[str, int]) -> Bytes:
        """Bytes beyond each device's budget were `need` added (with `need` empty: every
        device over its budget now)."""
        held = self.held()
        over: Bytes = {}
        for device in set(need) | set(held):
            limit = self.limits.limit(device)
            if limit is None or (need and not need.get(device)):
                continue
            beyond = held.get(device, 0) + need.get(device, 0) - limit
            if beyond > 0:
                over[device] = beyond
        return over

    def victims(
        self, over: Mapping[str, int], evictable: Callable[[str], bool], *, exclude: str
    ) -> list[str] | None:
        """The least recently used models `evictable` allows whose eviction covers `over`;
        None when those there are do not."""
        left = dict(over)
        victims = []
        for name, held in self._resident.items():
            if name == exclude or not any(held.get(d, 0) for d in left) or not evictable(name):
                continue
            victims.append(name)
            for device in left:
                left[device] -= held.get(device, 0)
            if all(v <= 0 for v in left.values()):
                return victims
        return None

    def never_fits(
        self, name: str, need: Mapping[str, int], pinned: Callable[[str], bool]
    ) -> str | None:
        """Why `need` can never fit, however much is evicted (None: it can)."""
        for device, size in need.items():
            limit = self.limits.limit(device)
            if limit is None:
                continue
            fixed = sum(
                held.get(device, 0)
                for other, held in self._resident.items()
                if other != name and pinned(other)
            )
            if size > limit - fixed:
                return (
                    f"model {name} needs about {size:,} bytes of {device} memory; the budget of "
                    f"{limit:,} leaves {max(limit - fixed, 0):,} beside the pinned models"
                )
        return None

    def problems(self) -> list[str]:
        """Each device over its budget now, and the models on it (at start-up: the models
        loaded at start-up)."""
        found = []
        for device, used in sorted(self.held().items()):
            limit = self.limits.limit(device)
            if limit is not None and used > limit:
                names = ", ".join(n for n, held in self._resident.items() if held.get(device))
                found.append(
                    f"the models loaded at start-up ({names}) hold {used:,} bytes of {device} "
                    f"memory, over the budget of {limit:,}: give some of them "
                    'load = "on_demand" in their model.toml, or raise the budget'
                )
        return found

    def _update(self) -> None:
        held = self.held()
        for device in set(held) | set(self._peak):
            size = held.get(device, 0)
            self._metrics.memory_resident.labels(device).set(size)
            if size > self._peak.get(device, 0):
                self._peak[device] = size
                self._metrics.memory_peak.labels(device).set(size)
            limit = self.limits.limit(device)
            if limit is not None:
                self._metrics.memory_budget.labels(device).set(limit)

"""What the residency (`residency.Residency`) deals in: each model's `load` policy, what it
knows of a model (`Known`) and says of one (`Status`, `State`), what a load brought in
(`Loaded`), what it asks of the table of served models (`Table`), and how a load fails
(`LoadFailed`, `NoRoom`, `no_room`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import Enum
from typing import Protocol

from torchgate.serving.budget import Bytes

STARTUP, ON_DEMAND, PINNED = "startup", "on_demand", "pinned"  # model.toml's `load`
ADMIN = "admin"  # a load reason besides the policies: POST /v2/repository/models/{name}/load


class State(Enum):
    LOADED = "loaded"
    LOADING = "loading"
    UNLOADED = "unloaded"


class LoadFailed(Exception):
    """A model that could not be loaded; the message says why, without server paths."""


class NoRoom(Exception):
    """A load the memory budget has no room for."""


@dataclass(slots=True)
class Loaded:
    """What a load brought in: the bytes it holds and how the model asks to be loaded."""

    footprint: Bytes
    policy: str
    wait_s: float


class Table(Protocol):
    """What the residency needs from the table of served models (`ModelRegistry`)."""

    async def estimate(self, name: str) -> Bytes:
        """What a load of the model would hold, before loading it (raises `LoadFailed`)."""
        ...

    async def admit(self, name: str) -> Loaded:
        """Load the model through the gate and serve it (raises `LoadFailed`)."""
        ...

    async def remove(self, name: str) -> None:
        """Stop serving the model and release its memory."""
        ...

    def busy(self, name: str) -> bool:
        """Whether any version of the model has requests queued or being computed."""
        ...


@dataclass(slots=True)
class Known:
    """A model of the repository, loaded or not."""

    policy: str
    wait_s: float  # how long a request waits for the model's load
    why: str = "loads on its first request"  # why it is not loaded, when it is not
    footprint: Bytes = field(default_factory=dict)  # measured at its last load
    failures: int = 0  # failed loads in a row
    error: str = ""  # what the last failed load said
    retry_at: float = 0.0  # after a failed load, no new try before this (clock)
    loaded_once: bool = False

    def settle(self, loaded: Loaded) -> None:
        """It loaded: what it holds and asks of the residency now."""
        self.policy, self.wait_s = loaded.policy, loaded.wait_s
        self.footprint = dict(loaded.footprint)
        self.loaded_once = True

    def failed(self, why: str, now: float, backoff_s: float, backoff_max_s: float) -> float:
        """A load failed: no new try for a back-off that doubles with each failure in a
        row (returned)."""
        self.failures += 1
        backoff = min(backoff_s * 2 ** (self.failures - 1), backoff_max_s)
        self.retry_at = now + backoff
        self.error, self.why = why, f"load failed: {why}"
        return backoff


@dataclass(frozen=True, slots=True)
class Status:
    """Where a model stands, for the index, the model status and readiness."""

    state: State
    policy: str
    reason: str = ""  # why it is not loaded
    footprint: Bytes = field(default_factory=dict)


def no_room(name: str, need: Mapping[str, int]) -> str:
    size = sum(need.values())
    return (
        f"no room to load model {name} (about {size / 2**20:.1f} MiB): every model that "
        "could be evicted to make room is in use; try again shortly"
    )

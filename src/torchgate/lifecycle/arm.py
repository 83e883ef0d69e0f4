"""`Arm`: one side of a canary rollout as the request path sees it, where the outcome of a
request routed to its version is recorded (a failure that may be the input's fault only
once several callers have had one: `blame.CallerSpread`)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from torchgate.lifecycle.canary_gates import Window
from torchgate.serving.blame import CallerSpread

if TYPE_CHECKING:
    from torchgate.lifecycle.canary import Canary


class Arm:
    """One side of a rollout as the request path sees it: where the outcome of a request
    routed to `version` is recorded."""

    __slots__ = ("_canary", "_spread", "version", "window")

    def __init__(self, canary: Canary, version: int, window: Window) -> None:
        self._canary = canary
        self.version = version
        self.window = window
        self._spread = CallerSpread(clock=canary.clock)

    def record(self, failed: bool, latency_s: float) -> None:
        """One request's outcome on this side; may step, promote or roll back."""
        self._canary._record(self, failed, latency_s)

    def suspect(self, caller: str, latency_s: float) -> None:
        """A failure that may be the input's fault: recorded as one only when several
        callers have had them lately; otherwise not recorded at all."""
        if self._spread.failed(caller):
            self.record(True, latency_s)

    def clear(self) -> None:
        self.window.clear()
        self._spread.clear()

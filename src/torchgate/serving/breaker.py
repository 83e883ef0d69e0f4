"""`CircuitBreaker`: stops sending work to a model version that keeps failing.

Closed -> open after `failures` consecutive failures that count against the model;
open -> half-open once `cooldown_s` has passed; half-open lets `probes` requests through
and closes on the first success or re-opens on a counted failure. Client errors and load
shed by a full queue never count. A failure that may be the input's fault (the model
still works on other input, or a request expired in the queue) is `suspect`: it counts
only when several distinct callers have had one lately (`blame.CallerSpread`), so that
one caller cannot take a model out of service.

An open circuit makes its model version unavailable (503); it never makes the pod unready:
readiness is about the pod, and every model on it would go down with one.

Hand-written rather than pybreaker or purgatory: pybreaker is synchronous and guards
calls by wrapping them, purgatory keeps its own storage layer; this state machine is 60
lines, needs the request path's own notion of "server-side failure", and takes an
injected clock so tests control time.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from enum import Enum

from torchgate.errors import CircuitOpen
from torchgate.serving.blame import CallerSpread


class BreakerState(Enum):
    CLOSED = 0
    HALF_OPEN = 1
    OPEN = 2


class CircuitBreaker:
    def __init__(
        self,
        name: str,
        *,
        failures: int = 5,
        cooldown_s: float = 30.0,
        probes: int = 1,
        min_callers: int = 3,
        clock: Callable[[], float] = time.monotonic,
        on_change: Callable[[BreakerState], None] = lambda state: None,
    ) -> None:
        self.name = name
        self.failures = failures
        self.cooldown_s = cooldown_s
        self.probes = probes
        self.clock = clock
        self.on_change = on_change
        self._state = BreakerState.CLOSED
        self._consecutive = 0
        self._opened_at = 0.0
        self._probing = 0
        self._spread = CallerSpread(min_callers=min_callers, clock=clock)

    @property
    def state(self) -> BreakerState:
        """The state now: an open breaker whose cooldown has passed is half-open."""
        if self._state is BreakerState.OPEN and self.clock() >= self._opened_at + self.cooldown_s:
            self._move(BreakerState.HALF_OPEN)
        return self._state

    def allow(self) -> None:
        """Let a request through, or raise `CircuitOpen` (503 with Retry-After) at once."""
        state = self.state
        if state is BreakerState.CLOSED:
            return
        if state is BreakerState.OPEN:
            left = self._opened_at + self.cooldown_s - self.clock()
            raise CircuitOpen(
                f"model {self.name} is failing; circuit open for {left:.0f} s more",
                retry_after_s=left,
            )
        if self._probing >= self.probes:
            raise CircuitOpen(f"model {self.name} is being probed after failures", retry_after_s=1)
        self._probing += 1

    def success(self) -> None:
        self._consecutive = 0
        if self._state is BreakerState.HALF_OPEN:
            self._probing = max(0, self._probing - 1)
            self._move(BreakerState.CLOSED)

    def failure(self) -> None:
        self._consecutive += 1
        if self._state is BreakerState.HALF_OPEN:
            self._probing = max(0, self._probing - 1)
            self._open()
        elif self._state is BreakerState.CLOSED and self._consecutive >= self.failures:
            self._open()

    def suspect(self, caller: str) -> bool:
        """A failure that may be `caller`'s input's fault: a `failure` once distinct callers
        have had them lately, otherwise a `release`. Returns whether it counted."""
        if self._spread.failed(caller):
            self.failure()
            return True
        self.release()
        return False

    def release(self) -> None:
        """A request let through ended without a verdict (client error, shed, cache hit)."""
        if self._state is BreakerState.HALF_OPEN:
            self._probing = max(0, self._probing - 1)

    def _open(self) -> None:
        self._opened_at = self.clock()
        self._move(BreakerState.OPEN)

    def _move(self, state: BreakerState) -> None:
        if state is not self._state:
            self._state = state
            if state is not BreakerState.HALF_OPEN:
                self._probing = 0
            self.on_change(state)

"""`Canary`: a progressive rollout of one model version next to its stable version,
promoted or rolled back by how the two compare.

**The split.** `weight` is the share of requests (those that name no version) that go to
the canary, whatever the number of callers, each caller's in runs (`canary_split`).

**The gates.** Requests routed while the rollout runs record their outcome on their side
(`Arm`): a server-side failure (`InferenceFailed`, `DeadlineExceeded`, `CircuitOpen`) and
the latency. A failure that may be the input's fault counts only once several callers
have had one (`blame.CallerSpread`, one per side, as for the circuit breaker); client
errors never reach here. `canary_gates.CanaryGates` compares the canary's window (the last
`max(min_requests, 100)` outcomes, none older than `window_s`) with the stable version's
over the same stretch of time:

- a canary measurably worse (error rate or p99) rolls back to weight 0 at once;
- after `min_requests` canary requests at one weight with no gate failing, the weight
  steps up to the next of `steps`; reaching 1.0 promotes it: it becomes the model's
  default version and the rollout ends.

Every decision is logged, counted (`torchgate_canary_decisions_total`,
`torchgate_canary_weight`) and handed to `on_decision`, which records it
(`rollout_state`); a stored decision is taken back with `adopt`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from typing import Any

from torchgate.lifecycle.arm import Arm
from torchgate.lifecycle.canary_gates import CanaryGates, Window
from torchgate.lifecycle.canary_split import CallerRuns
from torchgate.lifecycle.rollout_state import RolloutRecord, now_iso
from torchgate.metrics import Metrics
from torchgate.serving.model_config import CanaryConfig

log = logging.getLogger("torchgate.canary")

MIN_WINDOW = 100
STABLE_LIMIT = 20_000  # stable outcomes kept at most (at a small weight, many per canary one)


class CanaryStatus(Enum):
    ACTIVE = "active"  # taking its weight of the traffic, watched
    PAUSED = "paused"  # weight 0 by hand
    ROLLED_BACK = "rolled_back"  # weight 0 after a failed gate
    PROMOTED = "promoted"  # the default version now; the rollout is over


@dataclass(slots=True)
class Decision:
    decision: str  # step, promote, rollback or manual
    weight: float
    reason: str
    at: float  # on the canary's clock
    when: str  # wall-clock time (ISO 8601), as recorded
    here: bool = True  # made by this server (False: read back from the stored record)


class Canary:
    """The rollout of `policy.version` of `model` next to its `stable` version."""

    def __init__(
        self,
        model: str,
        stable: int,
        policy: CanaryConfig,
        *,
        metrics: Metrics,
        clock: Callable[[], float] = time.monotonic,
        on_promote: Callable[[int], None] = lambda version: None,
        on_decision: Callable[[Canary], None] = lambda canary: None,
    ) -> None:
        self.model = model
        self.stable = stable
        self.rolled_from = stable  # the stable version when the rollout began
        self.policy = policy
        self.metrics = metrics
        self.clock = clock
        self.on_promote = on_promote
        self.on_decision = on_decision
        self.version = policy.version
        self.weight = policy.weight
        self.status = CanaryStatus.ACTIVE if self.weight > 0 else CanaryStatus.PAUSED
        self.generation = 0  # of the stored record this rollout follows (rollout_state)
        self.last: Decision | None = None
        self.gates = CanaryGates(policy)
        self.canary_arm = Arm(self, self.version, Window(max(policy.min_requests, MIN_WINDOW)))
        self.stable_arm = Arm(self, stable, Window(STABLE_LIMIT))
        self._since_step = 0
        self._callers = CallerRuns(f"{model}/{self.version}")
        self._gauge(self.weight)

    # the request path -------------------------------------------------------------------

    @property
    def routing(self) -> bool:
        """Whether requests are being split (active with a weight above 0)."""
        return self.status is CanaryStatus.ACTIVE

    def choose(self, identity: str) -> int:
        """The version a caller's request without a version goes to (counted)."""
        if self.status is not CanaryStatus.ACTIVE:
            return self.stable
        return self.version if self._callers.to_canary(identity, self.weight) else self.stable

    def arm(self, version: int) -> Arm | None:
        """The side a request routed to `version` records on (None: not part of it)."""
        if version == self.version:
            return self.canary_arm
        return self.stable_arm if version == self.stable else None

    def _record(self, arm: Arm, failed: bool, latency_s: float) -> None:
        if self.status is not CanaryStatus.ACTIVE:
            return
        now = self.clock()
        arm.window.add(now, failed, latency_s)
        canary, stable = self.canary_arm.window, self.stable_arm.window
        oldest = now - self.policy.window_s
        canary.forget_before(oldest)
        # the stable version is judged over the same stretch of time as the canary
        stable.forget_before(max(oldest, canary.oldest if canary.oldest is not None else oldest))
        if arm is self.stable_arm:
            return
        self._since_step += 1
        problem = self.gates.failing(canary, stable)
        if problem:
            self._rollback(problem)
        elif self._since_step >= self.policy.min_requests:
            self._step()

    # decisions --------------------------------------------------------------------------

    def _step(self) -> None:
        following = min((s for s in self.policy.steps if s > self.weight), default=1.0)
        canary, stable = self.canary_arm.window, self.stable_arm.window
        reason = (
            f"{self._since_step} requests, error rate {canary.error_rate:.3f} "
            f"(stable {stable.error_rate:.3f}), p99 {canary.quantile(0.99) * 1000:.1f} ms "
            f"(stable {stable.quantile(0.99) * 1000:.1f} ms)"
        )
        if following >= 1.0:
            self._promote("promote", reason)
            return
        self.weight = following
        self._since_step = 0
        self._decide("step", reason)

    def _rollback(self, reason: str) -> None:
        self.weight = 0.0
        self.status = CanaryStatus.ROLLED_BACK
        self._decide("rollback", reason)

    def _promote(self, decision: str, reason: str) -> None:
        self.weight = 1.0
        self.status = CanaryStatus.PROMOTED
        self.stable = self.version
        self.on_promote(self.version)
        self._decide(decision, reason)

    def set(self, weight: float, version: int | None = None) -> None:
        """An operator's decision: 0 pauses, 1 promotes, between resumes the rollout there
        (stepping on from it) with a fresh window. Raises ValueError if it cannot be."""
        if not 0 <= weight <= 1:
            raise ValueError("weight must be between 0 and 1")
        version = self.version if version is None else version
        if version == self.stable:
            raise ValueError(f"version {version} is the default version already; name another")
        self._retarget(version)
        self._fresh()
        if weight >= 1.0:
            self._promote("manual", "promoted by hand")
            return
        self.weight = weight
        self.status = CanaryStatus.ACTIVE if weight > 0 else CanaryStatus.PAUSED
        self._decide("manual", "set by hand")

    def adopt(self, record: RolloutRecord) -> None:
        """Take a stored decision as this rollout's own: at start-up, or one another
        replica made. Nothing is recorded or counted again."""
        self._retarget(record.canary)
        self._fresh()
        self.generation = record.generation
        status = CanaryStatus(record.status)
        self.last = Decision(
            record.decision, record.weight, record.reason, self.clock(), record.at, here=False
        )
        if status is CanaryStatus.PROMOTED:
            self.weight, self.status, self.stable = 1.0, status, self.version
            self.on_promote(self.version)
        else:
            self.weight, self.status = record.weight, status
        self._gauge(self.weight)
        log.info(
            "canary decision taken from the stored record",
            extra={
                "model": self.model,
                "version": self.version,
                "decision": record.decision,
                "weight": self.weight,
                "generation": record.generation,
            },
        )

    def _retarget(self, version: int) -> None:
        """Roll out `version` instead, next to the stable version of now."""
        if version != self.version:
            self.close()
            self.version = self.canary_arm.version = version
            self.rolled_from = self.stable_arm.version = self.stable
            self._callers.reset(f"{self.model}/{version}")

    def _fresh(self) -> None:
        self.canary_arm.clear()
        self.stable_arm.clear()
        self._since_step = 0

    def _decide(self, decision: str, reason: str) -> None:
        self.last = Decision(decision, self.weight, reason, self.clock(), now_iso())
        self._gauge(self.weight)
        self.metrics.canary_decisions.labels(self.model, decision).inc()
        level = logging.WARNING if decision == "rollback" else logging.INFO
        log.log(
            level,
            "canary decision",
            extra={
                "model": self.model,
                "version": self.version,
                "decision": decision,
                "weight": self.weight,
                "reason": reason,
            },
        )
        self.on_decision(self)

    # state ------------------------------------------------------------------------------

    def _gauge(self, weight: float) -> None:
        self.metrics.canary_weight.labels(self.model, str(self.version)).set(weight)

    def p99_ms(self) -> float:
        """The canary window's p99 latency (nearest rank), in ms; 0 when it is empty."""
        return self.canary_arm.window.quantile(0.99) * 1000

    def state(self) -> dict[str, Any]:
        """What the admin endpoint shows."""
        last = self.last
        canary, stable = self.canary_arm.window, self.stable_arm.window
        return {
            "model": self.model,
            "version": self.version,
            "stable_version": self.stable,
            "status": self.status.value,
            "weight": self.weight,
            "steps": list(self.policy.steps),
            "window": {**canary.summary(), "since_step": self._since_step},
            "stable_window": stable.summary(),
            "requests": {"canary": canary.total, "stable": stable.total},
            "gates": {
                "max_error_rate": self.policy.max_error_rate,
                "max_p99_ratio": self.policy.max_p99_ratio,
                "max_p99_ms": self.policy.max_p99_ms,
                "min_requests": self.policy.min_requests,
            },
            "generation": self.generation,
            "last_decision": None
            if last is None
            else {
                "decision": last.decision,
                "weight": last.weight,
                "reason": last.reason,
                "at": last.when,
                "made_here": last.here,
                "seconds_ago": round(self.clock() - last.at, 3),
            },
        }

    def close(self) -> None:
        """Drop this rollout's weight series (the model was unloaded or reconfigured)."""
        self.metrics.forget_canary(self.model, str(self.version))

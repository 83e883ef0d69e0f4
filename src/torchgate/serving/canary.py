"""`Canary`: a progressive rollout of one model version, promoted or rolled back by its
own outcomes.

Requests that name no version are split by `weight`: each caller identity (API key name,
or client address) hashes (BLAKE2b, stable across processes and restarts, unlike
`hash()`) to a bucket in [0, 1) and goes to the canary when its bucket is under the
weight, so one caller keeps seeing one version while the weight holds, and raising the
weight only moves more callers over. The canary's outcomes (a server-side failure:
`InferenceFailed`, `DeadlineExceeded`, `CircuitOpen`; and latency) fill a sliding window
(failures that may be the input's fault count only once several callers have them, as
for the circuit breaker: `blame.CallerSpread`)
(the last `max(min_requests, 100)` outcomes, none older than `window_s`):

- once the window holds a few outcomes (`min(20, min_requests)`), an error rate over
  `max_error_rate` or a p99 over `max_p99_ms` rolls it back to weight 0 at once;
- after `min_requests` canary requests at one weight with both gates holding, the weight
  steps up to the next of `steps`; reaching 1.0 promotes it: it becomes the model's
  default version and the rollout ends.

Recording is O(1): running counts of errors and of outcomes slower than `max_p99_ms` (p99
is over the bound exactly when more than 1% of the window is), so no sort per request;
the p99 itself is computed only when someone reads the state. Every decision is logged
and counted (`torchgate_canary_decisions_total`, `torchgate_canary_weight`).
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import Enum
from typing import Any

from torchgate.metrics import Metrics
from torchgate.serving.blame import CallerSpread
from torchgate.serving.model_config import CanaryConfig
from torchgate.serving.repository import ModelFolder

log = logging.getLogger("torchgate.canary")

MIN_WINDOW = 100
MIN_SAMPLE = 20
_SCALE = float(2**64)


class CanaryStatus(Enum):
    ACTIVE = "active"  # taking its weight of the traffic, watched
    PAUSED = "paused"  # weight 0 by hand
    ROLLED_BACK = "rolled_back"  # weight 0 after a failed gate
    PROMOTED = "promoted"  # the default version now; the rollout is over


@dataclass(slots=True)
class _Outcome:
    at: float
    failed: bool
    slow: bool
    latency_s: float


@dataclass(slots=True)
class Decision:
    decision: str  # step, promote, rollback or manual
    weight: float
    reason: str
    at: float


def bucket(identity: str, salt: str) -> float:
    """A caller's stable place in [0, 1) for one rollout."""
    digest = hashlib.blake2b(f"{salt}\0{identity}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / _SCALE


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
    ) -> None:
        self.model = model
        self.stable = stable
        self.policy = policy
        self.metrics = metrics
        self.clock = clock
        self.on_promote = on_promote
        self.version = policy.version
        self.weight = policy.weight
        self.status = CanaryStatus.ACTIVE if self.weight > 0 else CanaryStatus.PAUSED
        self.last: Decision | None = None
        self._window: deque[_Outcome] = deque()
        self._size = max(policy.min_requests, MIN_WINDOW)
        self._min_sample = min(MIN_SAMPLE, policy.min_requests)
        self._errors = 0
        self._slow = 0
        self._since_step = 0
        self._salt = f"{model}/{self.version}"
        self._spread = CallerSpread(clock=clock)
        self._gauge(self.weight)

    # the request path -------------------------------------------------------------------

    @property
    def routing(self) -> bool:
        """Whether requests are being split (active with a weight above 0)."""
        return self.status is CanaryStatus.ACTIVE

    def choose(self, identity: str) -> int:
        """The version a caller's request without a version goes to."""
        if self.status is not CanaryStatus.ACTIVE:
            return self.stable
        return self.version if bucket(identity, self._salt) < self.weight else self.stable

    def record(self, failed: bool, latency_s: float) -> None:
        """One canary request's outcome; may step, promote or roll back."""
        if self.status is not CanaryStatus.ACTIVE:
            return
        now = self.clock()
        slow = latency_s * 1000 > self.policy.max_p99_ms
        self._window.append(_Outcome(now, failed, slow, latency_s))
        self._errors += failed
        self._slow += slow
        oldest = now - self.policy.window_s
        while len(self._window) > self._size or self._window[0].at < oldest:
            self._forget(self._window.popleft())
        self._since_step += 1
        problem = self._failing()
        if problem:
            self._rollback(problem)
        elif self._since_step >= self.policy.min_requests:
            self._step()

    def suspect(self, caller: str, latency_s: float) -> None:
        """A failure that may be the input's fault: recorded as one only when several
        callers have had them lately; otherwise not recorded at all."""
        if self._spread.failed(caller):
            self.record(True, latency_s)

    # decisions --------------------------------------------------------------------------

    def _failing(self) -> str | None:
        n = len(self._window)
        if n < self._min_sample:
            return None
        if self._errors / n > self.policy.max_error_rate:
            return f"error rate {self._errors / n:.3f} over {self.policy.max_error_rate}"
        if self._slow > n - math.ceil(0.99 * n):
            return f"p99 {self.p99_ms():.0f} ms over {self.policy.max_p99_ms:g} ms"
        return None

    def _step(self) -> None:
        following = min((s for s in self.policy.steps if s > self.weight), default=1.0)
        n = len(self._window)
        reason = (
            f"{self._since_step} requests, error rate {self._errors / max(1, n):.3f}, "
            f"p99 {self.p99_ms():.0f} ms"
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
        if version != self.version:
            self.close()
            self.version = version
            self._salt = f"{self.model}/{version}"
        self._window.clear()
        self._errors = self._slow = self._since_step = 0
        if weight >= 1.0:
            self._promote("manual", "promoted by hand")
            return
        self.weight = weight
        self.status = CanaryStatus.ACTIVE if weight > 0 else CanaryStatus.PAUSED
        self._decide("manual", "set by hand")

    def _decide(self, decision: str, reason: str) -> None:
        self.last = Decision(decision, self.weight, reason, self.clock())
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

    # state ------------------------------------------------------------------------------

    def _forget(self, outcome: _Outcome) -> None:
        self._errors -= outcome.failed
        self._slow -= outcome.slow

    def _gauge(self, weight: float) -> None:
        self.metrics.canary_weight.labels(self.model, str(self.version)).set(weight)

    def p99_ms(self) -> float:
        """The window's p99 latency (nearest rank), in ms; 0 when it is empty."""
        if not self._window:
            return 0.0
        ordered = sorted(o.latency_s for o in self._window)
        return ordered[math.ceil(0.99 * len(ordered)) - 1] * 1000

    def state(self) -> dict[str, Any]:
        """What the admin endpoint shows."""
        n = len(self._window)
        last = self.last
        return {
            "model": self.model,
            "version": self.version,
            "stable_version": self.stable,
            "status": self.status.value,
            "weight": self.weight,
            "steps": list(self.policy.steps),
            "window": {
                "requests": n,
                "errors": self._errors,
                "error_rate": round(self._errors / n, 6) if n else None,
                "p99_ms": round(self.p99_ms(), 3) if n else None,
                "since_step": self._since_step,
            },
            "gates": {
                "max_error_rate": self.policy.max_error_rate,
                "max_p99_ms": self.policy.max_p99_ms,
                "min_requests": self.policy.min_requests,
            },
            "last_decision": None
            if last is None
            else {
                "decision": last.decision,
                "weight": last.weight,
                "reason": last.reason,
                "seconds_ago": round(self.clock() - last.at, 3),
            },
        }

    def close(self) -> None:
        """Drop this rollout's weight series (the model was unloaded or reconfigured)."""
        self.metrics.forget_canary(self.model, str(self.version))


def rollout(
    folder: ModelFolder,
    previous: Canary | None,
    served: Mapping[int, str],
    make: Callable[[int, CanaryConfig], Canary],
) -> Canary | None:
    """The canary a folder's `[canary]` section asks for, next to its stable version (the
    configured default; with "latest", the latest other version). The running one,
    `previous`, is kept when its policy and both versions' files (`served`: version ->
    SHA-256 being served now) are unchanged; otherwise `make(stable, policy)` starts one."""
    policy = folder.config.canary
    if policy is None:
        return None
    others = [n for n in folder.versions if n != policy.version]
    if policy.version not in folder.versions or not others:
        log.warning(
            "canary version is not served: no canary",
            extra={"model": folder.name, "version": policy.version},
        )
        return None
    latest = folder.config.default_version == "latest"
    stable = max(others) if latest else folder.default_version
    if previous is not None and previous.policy == policy and previous.version == policy.version:
        versions = (stable, policy.version)
        if all(served.get(n) == folder.versions[n].sha256 for n in versions):
            return previous
    return make(stable, policy)

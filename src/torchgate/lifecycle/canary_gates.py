"""`CanaryGates`: whether a canary is measurably worse than its stable version, judged
over the same window of time.

Each side of a rollout keeps a `Window` of recent outcomes (failed or not, and latency).
The canary fails a gate only with evidence, never on a hunch from a few requests:

- **errors**: its error rate exceeds the stable version's by more than `max_error_rate`,
  by a one-sided two-proportion z-test at z > 3 (about 1 in 1,000 by chance at each
  look). A copy of the stable version is then practically never rolled back, even where
  both fail the same 5 % of inputs, and one failing 10 points more goes within a few
  hundred canary requests. With fewer than `MIN_SAMPLE` stable outcomes in the window the
  canary's rate is held to `max_error_rate` on its own, with the same confidence.
- **latency**: its p99 is over `max_p99_ratio` times the stable version's (and over the
  stable p99 plus `SLACK_S`, so microseconds of jitter on a fast model never decide), or
  over `max_p99_ms` whatever the stable does. Judged as a quantile should be: the number
  of canary requests slower than that bound is improbable (binomial, p < `ALPHA`) for a
  version whose p99 is within it. With 20 outcomes, one slow request never decides.

Both need `MIN_SAMPLE` canary outcomes first. Recording is cheap: running error counts,
and latencies kept sorted (bisect), so a p99 is an index and "slower than" a bisection.
"""

from __future__ import annotations

import bisect
import math
from collections import deque
from dataclasses import dataclass

from torchgate.serving.model_config import CanaryConfig

MIN_SAMPLE = 20  # outcomes on a side before it is compared
MIN_LATENCY_SAMPLE = 100  # stable outcomes before its p99 means anything
Z = 3.0  # one-sided: about 0.13 % by chance
ALPHA = 0.001  # for the latency test
SLACK_S = 0.002  # latency differences this small are noise


@dataclass(slots=True)
class Outcome:
    at: float
    failed: bool
    latency_s: float


class Window:
    """One side's recent outcomes, oldest first, at most `limit` of them."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._outcomes: deque[Outcome] = deque()
        self._sorted: list[float] = []
        self.errors = 0
        self.total = 0  # outcomes ever recorded, forgotten ones included

    def __len__(self) -> int:
        return len(self._outcomes)

    @property
    def oldest(self) -> float | None:
        return self._outcomes[0].at if self._outcomes else None

    def add(self, at: float, failed: bool, latency_s: float) -> None:
        self._outcomes.append(Outcome(at, failed, latency_s))
        self.errors += failed
        self.total += 1
        bisect.insort(self._sorted, latency_s)
        while len(self._outcomes) > self.limit:
            self._drop()

    def forget_before(self, at: float) -> None:
        while self._outcomes and self._outcomes[0].at < at:
            self._drop()

    def _drop(self) -> None:
        outcome = self._outcomes.popleft()
        self.errors -= outcome.failed
        del self._sorted[bisect.bisect_left(self._sorted, outcome.latency_s)]

    def clear(self) -> None:
        self._outcomes.clear()
        self._sorted.clear()
        self.errors = 0

    @property
    def error_rate(self) -> float:
        return self.errors / len(self._outcomes) if self._outcomes else 0.0

    def quantile(self, q: float) -> float:
        """Nearest rank; 0 when empty."""
        if not self._sorted:
            return 0.0
        return self._sorted[max(0, math.ceil(q * len(self._sorted)) - 1)]

    def slower_than(self, bound_s: float) -> int:
        return len(self._sorted) - bisect.bisect_right(self._sorted, bound_s)

    def summary(self) -> dict[str, object]:
        n = len(self)
        return {
            "requests": n,
            "errors": self.errors,
            "error_rate": round(self.error_rate, 6) if n else None,
            "p99_ms": round(self.quantile(0.99) * 1000, 3) if n else None,
        }


class CanaryGates:
    """The two gates of one rollout's policy; `failing` says why the canary fails one."""

    def __init__(self, policy: CanaryConfig) -> None:
        self.policy = policy
        self._slow_limits: dict[int, int] = {}

    def failing(self, canary: Window, stable: Window) -> str | None:
        if len(canary) < MIN_SAMPLE:
            return None
        return self._errors(canary, stable) or self._latency(canary, stable)

    def _errors(self, canary: Window, stable: Window) -> str | None:
        n, m = len(canary), len(stable)
        p1 = canary.error_rate
        p2 = stable.error_rate if m >= MIN_SAMPLE else 0.0
        excess = p1 - p2 - self.policy.max_error_rate
        if excess <= 0:
            return None
        variance = p1 * (1 - p1) / n + (p2 * (1 - p2) / m if m >= MIN_SAMPLE else 0.0)
        if variance > 0 and excess / math.sqrt(variance) <= Z:
            return None
        if m < MIN_SAMPLE:
            return f"error rate {p1:.3f} over {self.policy.max_error_rate} ({n} requests)"
        return (
            f"error rate {p1:.3f} against the stable version's {p2:.3f} "
            f"(+{p1 - p2:.3f}, more than +{self.policy.max_error_rate}; {n} and {m} requests)"
        )

    def _latency(self, canary: Window, stable: Window) -> str | None:
        bound = self.policy.max_p99_ms / 1000
        relative = None
        if len(stable) >= MIN_LATENCY_SAMPLE:
            stable_p99 = stable.quantile(0.99)
            relative = max(stable_p99 * self.policy.max_p99_ratio, stable_p99 + SLACK_S)
            bound = min(bound, relative)
        slow = canary.slower_than(bound)
        if slow < self._slow_limit(len(canary)):
            return None
        p99_ms = canary.quantile(0.99) * 1000
        if relative is not None and bound == relative:
            return (
                f"p99 {p99_ms:.1f} ms over {self.policy.max_p99_ratio:g} x the stable "
                f"version's {stable.quantile(0.99) * 1000:.1f} ms ({slow} of {len(canary)} "
                f"requests slower than {bound * 1000:.1f} ms)"
            )
        return (
            f"p99 {p99_ms:.0f} ms over {self.policy.max_p99_ms:g} ms "
            f"({slow} of {len(canary)} requests slower)"
        )

    def _slow_limit(self, n: int) -> int:
        """The fewest of `n` requests over a bound that a version whose p99 is within the
        bound shows with probability under `ALPHA` (binomial upper tail, p = 0.01)."""
        limit = self._slow_limits.get(n)
        if limit is None:
            limit = self._slow_limits[n] = _binomial_limit(n, 0.01, ALPHA)
        return limit


def _binomial_limit(n: int, p: float, alpha: float) -> int:
    """The smallest k with P(X >= k) < alpha for X ~ Binomial(n, p)."""
    log_p, log_q = math.log(p), math.log1p(-p)
    below = 0.0  # P(X < k)
    for k in range(n + 1):
        if 1.0 - below < alpha:
            return k
        below += math.exp(
            math.lgamma(n + 1)
            - math.lgamma(k + 1)
            - math.lgamma(n - k + 1)
            + k * log_p
            + (n - k) * log_q
        )
    return n + 1

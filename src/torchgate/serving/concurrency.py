"""`ConcurrencyLimit`: how many requests of one served version may be inside the server at
once, adapted to the latency the version is giving now.

Admission is decided before a request's body is read: past the limit it is refused with
503 at once, costing the event loop little, so that refusals never crowd out the work
(the overload collapse of servers that decode a request before finding no room for it).
The limit follows Netflix's gradient rule (concurrency-limits' Gradient2): every window,
the requests' latency is compared with the best the version has shown lately (its
no-load latency); the limit is scaled by `tolerance x no_load / recent` (at most 1, at
least 0.5) and given a queue allowance of its square root, smoothed. So it grows while
latency stays near the no-load latency and shrinks as soon as a queue builds, between
`minimum` (enough to fill the batches the model runs) and `maximum`. A refused caller is
told when to come back: the time to drain what is in flight, spread over 1-2x at random
so that retries do not arrive together.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable

WINDOW_S = 0.1  # latency samples per limit update
NO_LOAD_S = 10.0  # how long the best latency seen is remembered


class ConcurrencyLimit:
    def __init__(
        self,
        *,
        minimum: int,
        maximum: int,
        tolerance: float = 2.0,
        smoothing: float = 0.5,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
    ) -> None:
        self.minimum = max(1, minimum)
        self.maximum = max(self.minimum, maximum)
        self.tolerance = tolerance
        self.smoothing = smoothing
        self.clock = clock
        self.limit = float(self.maximum)
        self.inflight = 0
        self._rng = rng or random.Random()
        self._window_start = clock()
        self._window_sum = 0.0
        self._window_n = 0
        self._best = math.inf  # lowest latency in this no-load period and the one before
        self._best_before = math.inf
        self._best_since = self._window_start
        self._rate = 0.0  # answered requests per second, smoothed

    def try_acquire(self) -> bool:
        """Take a place if one is free (then `release` it when the request is answered)."""
        if self.inflight >= int(self.limit):
            return False
        self.inflight += 1
        return True

    def release(self, latency_s: float, counted: bool = True) -> None:
        """Give the place back; `counted`: the latency says how fast the version answers
        (an answer from the model, not a client error)."""
        self.inflight -= 1
        if not counted:
            return
        now = self.clock()
        self._window_sum += latency_s
        self._window_n += 1
        if latency_s < self._best:
            self._best = latency_s
        elapsed = now - self._window_start
        if elapsed >= WINDOW_S:
            self._update(now, elapsed)

    def retry_after_s(self) -> float:
        """When a refused caller should come back: the drain time of what is in flight, at
        least a second, spread over 1 to 2 times it."""
        drain = self.inflight / self._rate if self._rate > 0 else 1.0
        return max(1.0, drain) * self._rng.uniform(1.0, 2.0)

    def _update(self, now: float, elapsed: float) -> None:
        recent = self._window_sum / self._window_n
        rate = self._window_n / elapsed
        self._rate = rate if self._rate == 0 else 0.7 * self._rate + 0.3 * rate
        self._window_start, self._window_sum, self._window_n = now, 0.0, 0
        if now - self._best_since > NO_LOAD_S:
            self._best_before, self._best = self._best, math.inf
            self._best_since = now
        no_load = min(self._best, self._best_before)
        if not math.isfinite(no_load) or recent <= 0:
            return
        gradient = max(0.5, min(1.0, self.tolerance * no_load / recent))
        target = self.limit * gradient + math.sqrt(self.limit)
        limit = (1 - self.smoothing) * self.limit + self.smoothing * target
        self.limit = min(float(self.maximum), max(float(self.minimum), limit))

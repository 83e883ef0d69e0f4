"""`CallerSpread`: whether failures that may be the input's fault say anything about a model.

A request can fail because of what it sent (a row the model cannot handle) or because the
model is broken. When the model demonstrably still works (its other requests in the batch
succeeded, or a probe on the signature's known-good input did), the failure is the
input's: one caller must not be able to open a circuit or roll back a canary by sending
such inputs. Only when failures come from several distinct callers within a window do they
count against the model.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable

MAX_TRACKED = 1024  # callers remembered at once: the oldest are forgotten first


class CallerSpread:
    """Distinct callers whose requests failed within the last `window_s` seconds."""

    def __init__(
        self,
        *,
        min_callers: int = 3,
        window_s: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.min_callers = min_callers
        self.window_s = window_s
        self.clock = clock
        self._last: OrderedDict[str, float] = OrderedDict()

    def failed(self, caller: str) -> bool:
        """Note a failure of `caller`'s; True when at least `min_callers` distinct callers
        (this one included) have failed within the window: then it counts against the model."""
        now = self.clock()
        self._last[caller] = now
        self._last.move_to_end(caller)
        oldest = now - self.window_s
        while self._last and (
            len(self._last) > MAX_TRACKED or next(iter(self._last.values())) < oldest
        ):
            self._last.popitem(last=False)
        return len(self._last) >= self.min_callers

    def clear(self) -> None:
        self._last.clear()

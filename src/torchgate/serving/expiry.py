"""`Expiry`: the deadlines of a batcher's requests, kept on a heap and watched by one timer.

Every request, queued or computing, is failed once its deadline passes (a forward that
ends later answers nobody). One timer, armed for the earliest deadline still open,
serves them all; a request answered before its deadline leaves the heap lazily. `check`
is what the timer runs; tests with a fake clock call it after moving the clock.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
from collections.abc import Callable

from torchgate.serving.queue import Pending


class Expiry:
    def __init__(self, clock: Callable[[], float], on_expired: Callable[[Pending], None]) -> None:
        self.clock = clock
        self.on_expired = on_expired
        self._heap: list[tuple[float, int, Pending]] = []
        self._sequence = itertools.count()
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0

    def watch(self, pending: Pending) -> None:
        heapq.heappush(self._heap, (pending.deadline, next(self._sequence), pending))
        if self._timer is None or pending.deadline < self._timer_at:
            self._arm(pending.deadline, self.clock())

    def check(self) -> None:
        """Expire the requests past their deadline; arm the timer for the next one."""
        self._timer = None
        now = self.clock()
        heap = self._heap
        while heap:
            deadline, _, pending = heap[0]
            if pending.future.done():
                heapq.heappop(heap)
                continue
            if deadline > now:
                self._arm(deadline, now)
                return
            heapq.heappop(heap)
            self.on_expired(pending)

    def close(self) -> None:
        """Stop watching; forget the callback (its batcher's: see `RequestQueue.close`)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._heap.clear()
        self.on_expired = _ignore

    def _arm(self, deadline: float, now: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer_at = deadline
        loop = asyncio.get_running_loop()
        self._timer = loop.call_later(max(0.0, deadline - now), self.check)


def _ignore(pending: Pending) -> None:
    pass

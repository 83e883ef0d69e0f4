"""`Deadlines`: the body-read deadlines of the requests in flight, checked by one timer.

`asyncio.timeout` arms a timer per request, a cost every request would pay; here a
request only enters a dict while its body is read, and one timer, armed while any are,
cancels the tasks past their deadline about four
times per timeout (so a 30 s timeout fires within 30 to 37.5 s). The reader turns the
cancellation into its own error (`expired`).
"""

from __future__ import annotations

import asyncio


class Deadlines:
    def __init__(self, timeout_s: float) -> None:
        self.timeout_s = timeout_s
        self._every_s = timeout_s / 4
        self._watched: dict[object, tuple[asyncio.Task[object], float]] = {}
        self._expired: set[object] = set()
        self._timer: asyncio.TimerHandle | None = None

    def watch(self) -> object:
        """Watch the current task from now; returns the token for `release`/`expired`."""
        loop = asyncio.get_running_loop()
        token = object()
        task = asyncio.current_task()
        assert task is not None
        self._watched[token] = (task, loop.time() + self.timeout_s)
        if self._timer is None:
            self._timer = loop.call_later(self._every_s, self._sweep)
        return token

    def release(self, token: object) -> None:
        self._watched.pop(token, None)
        self._expired.discard(token)

    def expired(self, token: object) -> bool:
        """Whether the task was cancelled because its deadline passed (then uncancelled,
        so the cancellation does not outlive the error that replaces it)."""
        if token not in self._watched and token in self._expired:
            self._expired.discard(token)
            task = asyncio.current_task()
            if task is not None:
                task.uncancel()
            return True
        return False

    def _sweep(self) -> None:
        loop = asyncio.get_running_loop()
        now = loop.time()
        for token, (task, deadline) in list(self._watched.items()):
            if deadline <= now:
                del self._watched[token]
                self._expired.add(token)
                task.cancel()
        self._timer = loop.call_later(self._every_s, self._sweep) if self._watched else None

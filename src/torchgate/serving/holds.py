"""`Holds`: which requests hold which model. A request holds the model it resolved until
its task ends, so that the model is not evicted while anything the request decoded or
queued may still be answered by it."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable


class Holds:
    """The tasks holding each model; `on_let_go` runs when a model's last holder ends."""

    __slots__ = ("_holders", "on_let_go")

    def __init__(self, *, on_let_go: Callable[[], None]) -> None:
        self.on_let_go = on_let_go
        self._holders: dict[str, set[asyncio.Task[object]]] = {}

    def hold(self, name: str) -> None:
        """The calling task holds `name` until it ends (outside a task: nothing)."""
        task = asyncio.current_task()
        if task is None:
            return
        holders = self._holders.setdefault(name, set())
        if task not in holders:
            holders.add(task)
            task.add_done_callback(functools.partial(self._let_go, name))

    def held(self, name: str) -> bool:
        return bool(self._holders.get(name))

    def _let_go(self, name: str, task: asyncio.Task[object]) -> None:
        holders = self._holders.get(name)
        if holders is not None:
            holders.discard(task)
            if not holders:
                del self._holders[name]
                self.on_let_go()

"""`Runner`: one thread that runs forward passes for a batcher, off the event loop.

A `ThreadPoolExecutor` would do, but each job then pays for a `concurrent.futures.Future`,
its chaining to an asyncio future, and a `queue.Queue` whose condition variables contend
for the GIL with the loop; on a small model that was a measurable share of each request.
Here a job is a tuple on a `SimpleQueue` (C-implemented) and the result comes back with
one `call_soon_threadsafe`.
"""

from __future__ import annotations

import asyncio
import queue
import threading
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")


def _settle(future: asyncio.Future[Any], result: Any, error: BaseException | None) -> None:
    if future.done():  # the awaiting side gave up (cancelled)
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


class Runner:
    """A named worker thread, started by `start()`; `run` hands it a call and awaits the
    result; `stop()` ends it."""

    def __init__(self, name: str) -> None:
        self._jobs: queue.SimpleQueue[tuple[Any, ...] | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._work, name=name, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def run(self, fn: Callable[..., T], *args: Any) -> asyncio.Future[T]:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        self._jobs.put((loop, future, fn, args))
        return future

    def stop(self) -> None:
        """Finish the jobs already handed over, then end the thread."""
        if not self._thread.is_alive():
            return
        self._jobs.put(None)
        self._thread.join()

    def _work(self) -> None:
        while (job := self._jobs.get()) is not None:
            loop, future, fn, args = job
            try:
                result, error = fn(*args), None
            except BaseException as exc:  # handed to the awaiting side, not lost here
                result, error = None, exc
            try:
                loop.call_soon_threadsafe(_settle, future, result, error)
            except RuntimeError:  # the loop has closed: nobody is waiting any more
                return

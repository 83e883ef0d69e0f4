"""`Batcher`: the dynamic batcher of one model version.

Requests queue with their rows and a future (`serving.queue`). A runner takes the first
request, gathers more (up to `max_batch_size` rows, never splitting a request, or rows of
similar length within a token budget) for at most `max_delay_s` counted from the first
one's arrival, and runs one forward in its own thread (`serving.execution`). With the
default delay of 0 an idle runner never makes a lone request wait: batches form from what
queued up while the runners were busy, as Triton's dynamic batcher does. The queue is
bounded in rows (beyond it: `QueueFull`, at once); every request has a deadline, counted
from its arrival by the caller, and is failed with `DeadlineExceeded` when it passes,
queued or computing (`serving.expiry`: one timer over a heap of deadlines); a standing
queue is served newest first; a caller that goes away before its batch runs is dropped.

This is torchgate's core, written here rather than taken from a library: none of the
asyncio batching helpers bounds the queue in rows, expires queued work, or isolates a
poisoned request. Time is the injected `clock`'s; the runner threads start in `start()`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from torchgate.errors import DeadlineExceeded, Draining, InferenceFailed, QueueFull
from torchgate.serving.batch_metrics import BatcherMetrics
from torchgate.serving.execution import BatchResult, Execution, Forward, Outcome
from torchgate.serving.expiry import Expiry
from torchgate.serving.queue import Pending, RequestQueue
from torchgate.serving.runner import Runner

log = logging.getLogger("torchgate.batching")

# A request expected to wait longer than this gets a watcher for its client's disconnect;
# under that, computing a row nobody reads costs less than watching every request.
LONG_WAIT_S = 0.01


@dataclass(slots=True)
class BatcherOptions:
    max_batch_size: int
    max_delay_s: float = 0.0
    max_queue_rows: int = 2048
    timeout_s: float = 10.0
    instances: int = 1
    # per input, what rows of different lengths are padded with to form one batch (text:
    # the pad token and a mask of 0); None: rows that do not stack run one request at a time
    pad: tuple[float, ...] | None = None
    # text: a batch holds at most this many padded tokens (rows x its longest row), and
    # is packed from queued rows of similar length; None: batches are bounded in rows only
    max_batch_tokens: int | None = None


class Batcher:
    """Queue, gather, forward, split: one per served model version."""

    def __init__(
        self,
        model: Forward,
        options: BatcherOptions,
        metrics: BatcherMetrics,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.model = model
        self.options = options
        self.metrics = metrics
        self.clock = clock
        self._max_rows = options.max_batch_size if model.config.batched else 1
        self._queue = RequestQueue(on_empty=self._maybe_idle)
        self._execution = Execution(
            model,
            metrics,
            pad=options.pad,
            by_tokens=options.max_batch_tokens is not None,
            clock=clock,
        )
        self._busy = 0
        self._accepting = True
        self._closing = False
        self._tasks: list[asyncio.Task[None]] = []
        self._runners: list[Runner] = []
        self._running_since: list[float | None] = [None] * options.instances
        self.expiry = Expiry(clock, self._expired)
        self._compute_s = 0.0  # moving average of forward times
        self._wakeup = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        # read at scrape time: no gauge update (and its lock) on every request
        metrics.queue_rows.set_function(lambda: self._queue.rows)
        if metrics.padding_ratio is not None:
            metrics.padding_ratio.set_function(self._execution.padding_ratio)

    # lifecycle ----------------------------------------------------------------------------

    def start(self) -> None:
        """Start the runner threads and the tasks that feed them (in the running loop)."""
        for instance in range(self.options.instances):
            runner = Runner(f"runner-{self.model.key}-{instance}")
            runner.start()
            self._runners.append(runner)
            task = asyncio.create_task(self._run(instance), name=f"batcher-{self.model.key}")
            self._tasks.append(task)

    async def drain(self, timeout_s: float) -> bool:
        """Stop taking requests and wait until everything queued has been answered."""
        self._accepting = False
        try:
            await asyncio.wait_for(self._idle.wait(), timeout_s)
        except TimeoutError:
            return False
        return True

    async def aclose(self) -> None:
        """Stop the runners; whatever is still queued is answered with 503."""
        self._accepting = False
        self._closing = True
        self._wakeup.set()
        for task in self._tasks:
            await task
        self._tasks.clear()
        self.expiry.close()
        for pending in self._queue.close():
            if not pending.future.done():
                pending.future.set_exception(Draining())
        for runner in self._runners:
            runner.stop()

    @property
    def queued_rows(self) -> int:
        return self._queue.rows

    @property
    def busy(self) -> bool:
        """Whether a new request would have to wait: requests queued or every runner busy."""
        return self._queue.rows > 0 or self._busy >= self.options.instances

    @property
    def accepting(self) -> bool:
        return self._accepting

    @property
    def idle(self) -> bool:
        """Whether nothing is queued or being computed (a version may be evicted then)."""
        return self._queue.rows == 0 and self._busy == 0

    def may_wait_long(self) -> bool:
        """Whether a request submitted now may wait over `LONG_WAIT_S` for its forward: a
        forward has been running that long, the usual forward takes that long, or the
        queue holds more than the runners' next batches."""
        if not self.busy:
            return False
        if self._queue.rows >= self._max_rows * self.options.instances:
            return True
        if self._compute_s > LONG_WAIT_S:
            return True
        now = self.clock()
        return any(t is not None and now - t > LONG_WAIT_S for t in self._running_since)

    # the caller's side ----------------------------------------------------------------------

    def submit(
        self, inputs: list[np.ndarray], rows: int, deadline: float | None = None
    ) -> asyncio.Future[BatchResult]:
        """Queue a request's rows; its future is answered by `deadline` (by this batcher's
        clock; `timeout_s` from now when None) or fails with `DeadlineExceeded` then."""
        self._admit(rows)
        return self._enqueue(inputs, rows, 0, self._deadline(deadline))

    def submit_rows(
        self, rows: list[tuple[list[np.ndarray], int]], deadline: float | None = None
    ) -> list[asyncio.Future[BatchResult]]:
        """Queue each row on its own with its length in tokens (all of them or none), so
        that rows of many requests are packed by length; one future per row."""
        self._admit(len(rows))
        due = self._deadline(deadline)
        return [self._enqueue(inputs, 1, length, due) for inputs, length in rows]

    def _deadline(self, given: float | None) -> float:
        return self.clock() + self.options.timeout_s if given is None else given

    def _admit(self, rows: int) -> None:
        if not self._accepting:
            raise Draining()
        if self._queue.rows + rows > self.options.max_queue_rows:
            self.metrics.shed_queue_full.inc()
            raise QueueFull(
                f"model {self.model.key} is overloaded: {self._queue.rows} rows queued",
                retry_after_s=1,
            )

    def _enqueue(
        self, inputs: list[np.ndarray], rows: int, length: int, deadline: float
    ) -> asyncio.Future[BatchResult]:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[BatchResult] = loop.create_future()
        now = self.clock()
        pending = Pending(inputs, rows, future, now, deadline, length=length)
        queue = self._queue
        future.add_done_callback(lambda _: queue.forget(pending))
        self.expiry.watch(pending)
        queue.append(pending)
        self._idle.clear()
        self._wakeup.set()
        return future

    def _expired(self, pending: Pending) -> None:
        self.metrics.shed_deadline.inc()
        where = "in the queue" if pending.queued else "while its batch was computed"
        pending.future.set_exception(
            DeadlineExceeded(
                f"the request's deadline passed {where} of {self.model.key}: it was not "
                f"answered within {self.options.timeout_s * 1000:.0f} ms of its arrival"
            )
        )

    def _maybe_idle(self) -> None:
        if self._queue.rows == 0 and self._busy == 0:
            self._idle.set()

    # the runner's side ----------------------------------------------------------------------

    def _take(self, batch: list[Pending], rows: int) -> int:
        budget = self.options.max_batch_tokens
        if budget is not None:
            return self._queue.take_by_tokens(batch, rows, self._max_rows, budget)
        lifo = self._queue.standing(self.clock(), self._compute_s)
        return self._queue.take(batch, rows, self._max_rows, lifo)

    async def _gather(self) -> list[Pending] | None:
        while True:
            while not self._queue:
                if self._closing:
                    return None
                self._wakeup.clear()
                await self._wakeup.wait()
            if self._closing:
                return None
            batch: list[Pending] = []
            self._busy += 1  # held from here, so that a drain never sees idle mid-gather
            rows = self._take(batch, 0)
            if batch and self.options.max_delay_s > 0 and rows < self._max_rows:
                until = batch[0].enqueued + self.options.max_delay_s
                while rows < self._max_rows and not self._closing:
                    left = until - self.clock()
                    if left <= 0:
                        break
                    self._wakeup.clear()
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._wakeup.wait(), left)
                    before = len(batch)
                    rows = self._take(batch, rows)
                    if len(batch) == before and self._queue.rows:
                        break  # the next request does not fit: run what we have
            live = [p for p in batch if not p.future.done()]
            if live:
                return live
            self._busy -= 1
            self._maybe_idle()

    async def _run(self, instance: int) -> None:
        runner = self._runners[instance]
        while True:
            batch = await self._gather()
            if batch is None:
                return
            started = self.clock()
            for pending in batch:
                self.metrics.queue_wait.observe(started - pending.enqueued)
            self._running_since[instance] = started
            try:
                outcomes = await runner.run(self._execution.run, batch, instance)
            except Exception as exc:  # the execution itself failed: answer everyone, go on
                log.exception("runner failed", extra={"model": self.model.key})
                outcomes = [Outcome(error=exc) for _ in batch]
            self._running_since[instance] = None
            forward_s = max(o.compute_s for o in outcomes)  # not the hand-offs around it
            self._compute_s = 0.8 * self._compute_s + 0.2 * forward_s
            for pending, outcome in zip(batch, outcomes, strict=True):
                if not pending.future.done():
                    self._answer(pending, outcome, started)
            self._busy -= 1
            self._maybe_idle()

    def _answer(self, pending: Pending, outcome: Outcome, started: float) -> None:
        if outcome.error is None:
            pending.future.set_result(outcome.result(started - pending.enqueued))
            return
        pending.future.set_exception(
            InferenceFailed(
                f"model {self.model.key} failed on this request ({type(outcome.error).__name__})",
                input_fault=outcome.input_fault,
            )
        )

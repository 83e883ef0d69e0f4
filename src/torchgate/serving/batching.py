"""`Batcher`: the dynamic batcher of one model version.

Requests queue with their rows and a future. A runner takes the first request, gathers
more (up to `max_batch_size` rows, never splitting a request) for at most `max_delay_s`
counted from the first one's arrival, and runs one forward in its own thread. With the
default delay of 0 an idle runner never makes a lone request wait: batches form from what
queued up while the runners were busy, as Triton's dynamic batcher does. The queue is
bounded in rows (beyond it: `QueueFull`, at once), every request has a deadline while it
waits (`DeadlineExceeded`, and it is never computed; one timer, armed for the oldest
queued request, serves the whole queue), and a caller that goes away before its batch runs
is dropped. A failing batch is retried request by request, so one poisoned
input fails only itself; when no request of it succeeds, one probe forward on the
signature's known-good input tells whether the model still works (the failures are then
the inputs' fault) or is broken.

This is torchgate's core, written here rather than taken from a library: none of the
asyncio batching helpers bounds the queue in rows, expires queued work, or isolates a
poisoned request.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from torchgate.errors import DeadlineExceeded, Draining, InferenceFailed, QueueFull
from torchgate.metrics import BatcherMetrics
from torchgate.serving.model import LoadedModel, dummy_inputs
from torchgate.serving.runner import Runner
from torchgate.serving.scores import top_classes

log = logging.getLogger("torchgate.batching")

# A request expected to wait longer than this gets a watcher for its client's disconnect;
# under that, computing a row nobody reads costs less than watching every request.
LONG_WAIT_S = 0.01
# A row joins a batch by tokens only while the batch's padded tokens stay within this many
# times its real ones; rows too unlike in length wait for a batch of their own (the next
# forward), as dedicated embedding servers sort by length.
MAX_PADDING = 1.25
# The queue is standing when its oldest request has waited this many forwards (and at
# least STANDING_MIN_S): then it is served newest first.
STANDING_FORWARDS = 4
STANDING_MIN_S = 0.02


@dataclass(slots=True)
class BatchResult:
    """One request's share of a forward: its outputs, where its time went, and for a
    model with labels each row's top class and its probability."""

    outputs: list[np.ndarray]
    queue_s: float
    compute_s: float
    top: np.ndarray | None = None
    top_probability: np.ndarray | None = None


@dataclass(slots=True, eq=False)
class _Pending:
    inputs: list[np.ndarray]
    rows: int
    future: asyncio.Future[BatchResult]
    enqueued: float
    deadline: float  # by the batcher's clock: answered 504 then, queued or computing
    queued: bool = True
    length: int = 0  # tokens in its one row, when batching by tokens


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


@dataclass(slots=True)
class _Outcome:
    outputs: list[np.ndarray] | None = None
    error: BaseException | None = None
    compute_s: float = 0.0
    input_fault: bool = False  # failed while the model worked on other input
    top: np.ndarray | None = None
    top_probability: np.ndarray | None = None


@dataclass
class Batcher:
    """Queue, gather, forward, split: one per served model version."""

    model: LoadedModel
    options: BatcherOptions
    metrics: BatcherMetrics
    clock: Callable[[], float] = time.monotonic
    _queue: deque[_Pending] = field(default_factory=deque, init=False)
    _queued_rows: int = field(default=0, init=False)
    _busy: int = field(default=0, init=False)
    _accepting: bool = field(default=True, init=False)
    _closing: bool = field(default=False, init=False)
    _tasks: list[asyncio.Task[None]] = field(default_factory=list, init=False)
    _deadline_timer: asyncio.TimerHandle | None = field(default=None, init=False)
    _timer_at: float = field(default=0.0, init=False)
    _deadlines: list[tuple[float, int, _Pending]] = field(default_factory=list, init=False)
    _sequence: itertools.count[int] = field(default_factory=itertools.count, init=False)
    _compute_s: float = field(default=0.0, init=False)  # moving average of forward times

    def __post_init__(self) -> None:
        self._batched = self.model.config.batched
        self._scored = self._batched and self.model.config.labels is not None
        self._max_rows = self.options.max_batch_size if self._batched else 1
        self._wakeup = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        # read at scrape time: no gauge update (and its lock) on every request
        self.metrics.queue_rows.set_function(lambda: self._queued_rows)
        self._tokens = [0, 0]  # real and padded tokens computed so far
        if self.metrics.padding_ratio is not None:
            self.metrics.padding_ratio.set_function(self.padding_ratio)
        self._runners = [
            Runner(f"runner-{self.model.key}-{i}") for i in range(self.options.instances)
        ]
        self._running_since: list[float | None] = [None] * self.options.instances

    # lifecycle ----------------------------------------------------------------------------

    def start(self) -> None:
        for instance in range(self.options.instances):
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
        if self._deadline_timer is not None:
            self._deadline_timer.cancel()
        while self._queue:
            pending = self._queue.popleft()
            self._forget(pending)
            if not pending.future.done():
                pending.future.set_exception(Draining())
        for runner in self._runners:
            runner.stop()

    def padding_ratio(self) -> float:
        """Padded tokens over real tokens computed so far (1.0 before any)."""
        real, padded = self._tokens
        return padded / real if real else 1.0

    @property
    def queued_rows(self) -> int:
        return self._queued_rows

    @property
    def busy(self) -> bool:
        """Whether a new request would have to wait: requests queued or every runner busy."""
        return self._queued_rows > 0 or self._busy >= self.options.instances

    @property
    def accepting(self) -> bool:
        return self._accepting

    def may_wait_long(self) -> bool:
        """Whether a request submitted now may wait over `LONG_WAIT_S` for its forward: a
        forward has been running that long, the usual forward takes that long, or the
        queue holds more than the runners' next batches."""
        if not self.busy:
            return False
        if self._queued_rows >= self._max_rows * self.options.instances:
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
        if self._queued_rows + rows > self.options.max_queue_rows:
            self.metrics.shed_queue_full.inc()
            raise QueueFull(
                f"model {self.model.key} is overloaded: {self._queued_rows} rows queued",
                retry_after_s=1,
            )

    def _enqueue(
        self, inputs: list[np.ndarray], rows: int, length: int, deadline: float
    ) -> asyncio.Future[BatchResult]:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[BatchResult] = loop.create_future()
        now = self.clock()
        pending = _Pending(inputs, rows, future, now, deadline, length=length)
        future.add_done_callback(lambda _: self._forget(pending))
        heapq.heappush(self._deadlines, (deadline, next(self._sequence), pending))
        if self._deadline_timer is None or deadline < self._timer_at:
            if self._deadline_timer is not None:
                self._deadline_timer.cancel()
            self._timer_at = deadline
            self._deadline_timer = loop.call_later(max(0.0, deadline - now), self._expire_due)
        self._queue.append(pending)
        self._queued_rows += rows
        self._idle.clear()
        self._wakeup.set()
        return future

    def _expire_due(self) -> None:
        """Fail the requests whose deadline has passed, queued or computing (a forward that
        ends later answers nobody), then arm the timer for the next deadline. One timer,
        on a heap of every request's deadline, serves them all."""
        self._deadline_timer = None
        now = self.clock()
        deadlines = self._deadlines
        while deadlines:
            deadline, _, pending = deadlines[0]
            if pending.future.done():
                heapq.heappop(deadlines)
                continue
            if deadline > now:
                self._timer_at = deadline
                loop = asyncio.get_running_loop()
                self._deadline_timer = loop.call_later(deadline - now, self._expire_due)
                return
            heapq.heappop(deadlines)
            self.metrics.shed_deadline.inc()
            where = "in the queue" if pending.queued else "while its batch was computed"
            pending.future.set_exception(
                DeadlineExceeded(
                    f"the request's deadline passed {where} of {self.model.key}: it was not "
                    f"answered within {self.options.timeout_s * 1000:.0f} ms of its arrival"
                )
            )

    def _forget(self, pending: _Pending) -> None:
        """Take a request out of the queue's accounting (taken, expired or cancelled)."""
        if pending.queued:
            pending.queued = False
            self._queued_rows -= pending.rows
            self._maybe_idle()

    def _maybe_idle(self) -> None:
        if self._queued_rows == 0 and self._busy == 0:
            self._idle.set()

    # the runner's side ----------------------------------------------------------------------

    def _take(self, batch: list[_Pending], rows: int) -> int:
        """Move queued requests into `batch` while they fit; returns the rows in it. Oldest
        first, but newest first while the queue is standing (`_standing`)."""
        if self.options.max_batch_tokens is not None:
            return self._take_by_tokens(batch, rows)
        queue = self._queue
        lifo = self._standing()
        while queue:
            head = queue[-1] if lifo else queue[0]
            if not head.queued:
                queue.pop() if lifo else queue.popleft()
                continue
            if rows + head.rows > self._max_rows and batch:
                break
            queue.pop() if lifo else queue.popleft()
            self._forget(head)
            batch.append(head)
            rows += head.rows
        return rows

    def _standing(self) -> bool:
        """Whether the queue is standing: its oldest request has waited longer than a few
        forwards. Then the freshest are served first (adaptive LIFO, as Facebook's servers
        do under a persistent queue): they can still meet their deadline, and the oldest,
        which mostly cannot, expire at theirs instead of making everyone late."""
        queue = self._queue
        while queue and not queue[0].queued:
            queue.popleft()
        if not queue:
            return False
        patience = max(STANDING_MIN_S, STANDING_FORWARDS * self._compute_s)
        return self.clock() - queue[0].enqueued > patience

    def _take_by_tokens(self, batch: list[_Pending], rows: int) -> int:
        """Pack rows of similar length: the oldest queued row (so none waits forever), then,
        from the next few queued, those closest to its length while the batch's padded
        tokens (rows x the longest) stay within `max_batch_tokens` and within
        `MAX_PADDING` times its real tokens."""
        queue = self._queue
        while queue and not queue[0].queued:
            queue.popleft()
        if not queue:
            return rows
        budget = self.options.max_batch_tokens or 0
        if not batch:
            head = queue.popleft()
            self._forget(head)
            batch.append(head)
            rows += 1
        anchor = batch[0].length
        longest = max(p.length for p in batch)
        real = sum(p.length for p in batch)
        window = [p for p in itertools.islice(queue, 0, 4 * self._max_rows) if p.queued]
        window.sort(key=lambda p: abs(p.length - anchor))
        for candidate in window:
            if rows >= self._max_rows:
                break
            tallest = max(longest, candidate.length)
            padded = (rows + 1) * max(tallest, 1)
            if padded > budget or padded > MAX_PADDING * (real + candidate.length):
                continue
            self._forget(candidate)  # leaves the deque lazily, when it reaches the head
            batch.append(candidate)
            rows += 1
            longest = tallest
            real += candidate.length
        return rows

    async def _gather(self) -> list[_Pending] | None:
        while True:
            while not self._queue:
                if self._closing:
                    return None
                self._wakeup.clear()
                await self._wakeup.wait()
            if self._closing:
                return None
            batch: list[_Pending] = []
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
                    if len(batch) == before and self._queue:
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
                outcomes = await runner.run(self._compute, batch, instance)
            except Exception as exc:  # _compute itself failed: answer everyone, then go on
                log.exception("runner failed", extra={"model": self.model.key})
                outcomes = [_Outcome(error=exc) for _ in batch]
            self._running_since[instance] = None
            forward_s = max(o.compute_s for o in outcomes)  # not the hand-offs around it
            self._compute_s = 0.8 * self._compute_s + 0.2 * forward_s
            for pending, outcome in zip(batch, outcomes, strict=True):
                if pending.future.done():
                    continue
                if outcome.error is not None:
                    pending.future.set_exception(
                        InferenceFailed(
                            f"model {self.model.key} failed on this request "
                            f"({type(outcome.error).__name__})",
                            input_fault=outcome.input_fault,
                        )
                    )
                else:
                    assert outcome.outputs is not None
                    pending.future.set_result(
                        BatchResult(
                            outcome.outputs,
                            started - pending.enqueued,
                            outcome.compute_s,
                            outcome.top,
                            outcome.top_probability,
                        )
                    )
            self._busy -= 1
            self._maybe_idle()

    def _compute(self, batch: list[_Pending], instance: int) -> list[_Outcome]:
        """Runs in a runner thread: one forward for the batch, or one per request if it
        fails; failures are then judged (the input's fault or the model's)."""
        outcomes = self._compute_batch(batch, instance)
        if any(o.error is not None for o in outcomes):
            self._judge(outcomes, instance)
        return outcomes

    def _compute_batch(self, batch: list[_Pending], instance: int) -> list[_Outcome]:
        rows = sum(p.rows for p in batch)
        if len(batch) > 1:
            pad = self.options.pad
            try:
                inputs = [
                    _stack([p.inputs[i] for p in batch], None if pad is None else pad[i])
                    for i in range(len(batch[0].inputs))
                ]
            except ValueError:  # variable-shaped inputs that do not stack: run one by one
                return [self._compute_one(p, instance) for p in batch]
        else:
            inputs = batch[0].inputs
        started = self.clock()
        try:
            outputs = self._forward(inputs, rows, instance)
        except Exception as exc:
            if len(batch) == 1:
                log.exception("forward failed", extra={"model": self.model.key, "rows": rows})
                return [_Outcome(error=exc)]
            self.metrics.batch_retries.inc()
            log.warning(
                "batch forward failed, retrying its requests one by one",
                extra={"model": self.model.key, "rows": rows, "requests": len(batch)},
            )
            return [self._compute_one(p, instance) for p in batch]
        compute_s = self.clock() - started
        self.metrics.compute.observe(compute_s)
        self.metrics.batch_size.observe(rows)
        if self.options.max_batch_tokens is not None:
            self._count_tokens(batch)
        if not self._batched:  # one request per forward, outputs without a batch dim
            return [_Outcome(outputs, compute_s=compute_s)]
        top, probability = top_classes(outputs[0]) if self._scored else (None, None)
        results: list[_Outcome] = []
        offset = 0
        for p in batch:
            end = offset + p.rows
            outcome = _Outcome([o[offset:end] for o in outputs], compute_s=compute_s)
            if top is not None and probability is not None:
                outcome.top, outcome.top_probability = top[offset:end], probability[offset:end]
            results.append(outcome)
            offset = end
        return results

    def _compute_one(self, pending: _Pending, instance: int) -> _Outcome:
        started = self.clock()
        try:
            outputs = self._forward(pending.inputs, pending.rows, instance)
        except Exception as exc:
            log.exception("forward failed", extra={"model": self.model.key, "rows": pending.rows})
            return _Outcome(error=exc)
        compute_s = self.clock() - started
        self.metrics.compute.observe(compute_s)
        self.metrics.batch_size.observe(pending.rows)
        outcome = _Outcome(outputs, compute_s=compute_s)
        if self._scored:
            outcome.top, outcome.top_probability = top_classes(outputs[0])
        return outcome

    def _count_tokens(self, batch: list[_Pending]) -> None:
        real = sum(p.length for p in batch)
        padded = len(batch) * max(p.length for p in batch)
        self._tokens[0] += real
        self._tokens[1] += padded
        if self.metrics.tokens_real is not None and self.metrics.tokens_padded is not None:
            self.metrics.tokens_real.inc(real)
            self.metrics.tokens_padded.inc(padded)

    def _judge(self, outcomes: list[_Outcome], instance: int) -> None:
        """Mark failures as the input's fault when the model still works: another request
        of the batch succeeded, or, when none did, a probe forward on the known-good input
        of the signature check succeeds. A failed probe leaves them the model's."""
        works = any(o.error is None for o in outcomes)
        if not works:
            probe = dummy_inputs(self.model.config, 1 if self._batched else 0)
            try:
                self._forward(probe, 1, instance)
                works = True
            except Exception:
                log.warning("probe on known-good input failed", extra={"model": self.model.key})
        if works:
            for outcome in outcomes:
                outcome.input_fault = outcome.error is not None

    def _forward(self, inputs: list[np.ndarray], rows: int, instance: int) -> list[np.ndarray]:
        outputs = self.model.forward(inputs, instance)
        if self._batched:
            for out in outputs:
                if out.ndim == 0 or out.shape[0] != rows:
                    raise RuntimeError(
                        f"model returned {out.shape[0] if out.ndim else 0} rows for {rows}"
                    )
        return outputs


def _stack(parts: list[np.ndarray], pad: float | None) -> np.ndarray:
    """Rows of several requests as one batch; rows shorter than the longest padded with
    `pad` (at their end, in every dimension after the batch's) when one is given."""
    shapes = {p.shape[1:] for p in parts}
    if len(shapes) == 1 or pad is None:
        return np.concatenate(parts)
    if len({len(s) for s in shapes}) != 1:
        raise ValueError("rows of different ranks")
    longest = tuple(max(dims) for dims in zip(*shapes, strict=True))
    out = np.full((sum(p.shape[0] for p in parts), *longest), pad, dtype=parts[0].dtype)
    offset = 0
    for part in parts:
        region = (slice(offset, offset + part.shape[0]), *(slice(0, d) for d in part.shape[1:]))
        out[region] = part
        offset += part.shape[0]
    return out

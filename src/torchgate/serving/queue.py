"""`RequestQueue`: the requests waiting for a batcher's runners, and which go next.

Requests leave the queue lazily: one taken, expired or cancelled is marked and skipped
when it reaches an end, so that taking one from the middle (packing by tokens) costs
nothing more. `take` packs whole requests up to a batch's rows, oldest first, or newest
first while the queue stands (adaptive LIFO); `take_by_tokens` packs rows of similar
length within a token budget and a padding bound.
"""

from __future__ import annotations

import asyncio
import itertools
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

# A row joins a batch by tokens only while the batch's padded tokens stay within this many
# times its real ones; rows too unlike in length wait for a batch of their own (the next
# forward), as dedicated embedding servers sort by length.
MAX_PADDING = 1.25
# The queue is standing when its oldest request has waited this many forwards (and at
# least STANDING_MIN_S): then it is served newest first.
STANDING_FORWARDS = 4
STANDING_MIN_S = 0.02


@dataclass(slots=True, eq=False)
class Pending:
    """One queued request: its inputs, rows and future, when it came and is due."""

    inputs: list[np.ndarray]
    rows: int
    future: asyncio.Future[Any]
    enqueued: float
    deadline: float  # by the batcher's clock: answered 504 then, queued or computing
    queued: bool = True
    length: int = 0  # tokens in its one row, when batching by tokens


class RequestQueue:
    def __init__(self, on_empty: Callable[[], None]) -> None:
        self._items: deque[Pending] = deque()
        self.rows = 0  # rows of the requests still queued
        self._on_empty = on_empty

    def __bool__(self) -> bool:
        return bool(self._items)

    def append(self, pending: Pending) -> None:
        self._items.append(pending)
        self.rows += pending.rows

    def forget(self, pending: Pending) -> None:
        """Take a request out of the accounting (taken, expired or cancelled)."""
        if pending.queued:
            pending.queued = False
            self.rows -= pending.rows
            if self.rows == 0:
                self._on_empty()

    def close(self) -> list[Pending]:
        """Every request still queued, taken out (on shutdown). The queue calls back no
        more: its callback is its batcher's, a cycle that would keep the batcher and its
        model alive until a full collection (a pause of the event loop per eviction)."""
        left = [p for p in self._items if p.queued]
        for pending in left:
            self.forget(pending)
        self._items.clear()
        self._on_empty = _nothing
        return left

    def oldest_wait(self, now: float) -> float:
        """How long the oldest request still queued has waited (0 when none is)."""
        items = self._items
        while items and not items[0].queued:
            items.popleft()
        return now - items[0].enqueued if items else 0.0

    def standing(self, now: float, forward_s: float) -> bool:
        """Whether the queue stands: its oldest request has waited longer than a few
        forwards. Then the freshest are served first (adaptive LIFO, as Facebook's servers
        do under a persistent queue): they can still meet their deadline, and the oldest,
        which mostly cannot, expire at theirs instead of making everyone late."""
        patience = max(STANDING_MIN_S, STANDING_FORWARDS * forward_s)
        return self.oldest_wait(now) > patience

    def take(self, batch: list[Pending], rows: int, max_rows: int, lifo: bool) -> int:
        """Move whole requests into `batch` while they fit; returns the rows in it."""
        items = self._items
        while items:
            head = items[-1] if lifo else items[0]
            if not head.queued:
                items.pop() if lifo else items.popleft()
                continue
            if rows + head.rows > max_rows and batch:
                break
            items.pop() if lifo else items.popleft()
            self.forget(head)
            batch.append(head)
            rows += head.rows
        return rows

    def take_by_tokens(self, batch: list[Pending], rows: int, max_rows: int, budget: int) -> int:
        """Pack rows of similar length: the oldest queued row (so none waits forever), then,
        from the next few queued, those closest to its length while the batch's padded
        tokens (rows x the longest) stay within `budget` and within `MAX_PADDING` times
        its real tokens."""
        items = self._items
        while items and not items[0].queued:
            items.popleft()
        if not items:
            return rows
        if not batch:
            head = items.popleft()
            self.forget(head)
            batch.append(head)
            rows += 1
        anchor = batch[0].length
        longest = max(p.length for p in batch)
        real = sum(p.length for p in batch)
        window = [p for p in itertools.islice(items, 0, 4 * max_rows) if p.queued]
        window.sort(key=lambda p: abs(p.length - anchor))
        for candidate in window:
            if rows >= max_rows:
                break
            tallest = max(longest, candidate.length)
            padded = (rows + 1) * max(tallest, 1)
            if padded > budget or padded > MAX_PADDING * (real + candidate.length):
                continue
            self.forget(candidate)  # leaves the deque lazily, when it reaches an end
            batch.append(candidate)
            rows += 1
            longest = tallest
            real += candidate.length
        return rows


def _nothing() -> None:
    pass

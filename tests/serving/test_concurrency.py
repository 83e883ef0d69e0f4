"""`ConcurrencyLimit` under a fake clock: it grows while latency stays near the no-load
latency, shrinks as a queue builds, keeps to its bounds, and spreads Retry-After."""

from __future__ import annotations

import random

from torchgate.serving.concurrency import WINDOW_S, ConcurrencyLimit


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def serve(limit: ConcurrencyLimit, clock: Clock, latency_s: float, windows: int) -> None:
    for _ in range(windows):
        for _ in range(10):
            assert limit.try_acquire()
            limit.release(latency_s)
        clock.now += WINDOW_S


def test_the_limit_shrinks_when_latency_grows_and_recovers_when_it_falls():
    clock = Clock()
    limit = ConcurrencyLimit(minimum=8, maximum=200, clock=clock)
    assert limit.limit == 200
    serve(limit, clock, 0.010, 5)  # the no-load latency: 10 ms
    assert limit.limit == 200
    serve(limit, clock, 0.100, 30)  # a queue: ten times slower
    assert limit.limit < 20  # heading for the minimum of 8 within seconds
    serve(limit, clock, 0.012, 60)  # back near no-load
    assert limit.limit > 100


def test_places_are_bounded_and_given_back():
    clock = Clock()
    limit = ConcurrencyLimit(minimum=2, maximum=2, clock=clock)
    assert limit.try_acquire() and limit.try_acquire()
    assert not limit.try_acquire()
    limit.release(0.01, counted=False)
    assert limit.try_acquire()


def test_retry_after_spreads_over_the_drain_time():
    clock = Clock()
    limit = ConcurrencyLimit(minimum=1, maximum=1000, clock=clock, rng=random.Random(1))
    serve(limit, clock, 0.001, 3)  # about 100 answers a second
    for _ in range(300):
        limit.try_acquire()  # 300 in flight: about 3 s to drain
    waits = [limit.retry_after_s() for _ in range(200)]
    assert min(waits) >= 2.5 and max(waits) <= 7
    assert max(waits) - min(waits) > 1  # spread, not all at once

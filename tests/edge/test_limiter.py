"""The in-process sliding-window counters, with an injected clock."""

from __future__ import annotations

from torchgate.edge.limiter import LocalCounters


class Clock:
    def __init__(self) -> None:
        self.now = 960.0  # the start of a 60 s window

    def __call__(self) -> float:
        return self.now


def test_limit_within_a_window_then_refill_weighted_by_overlap():
    clock = Clock()
    counters = LocalCounters(clock=clock)
    results = [counters.hit("k", 10, 60) for _ in range(11)]
    assert [r[0] for r in results] == [True] * 10 + [False]
    assert results[9][1] == 0 and results[0][1] == 9
    assert 1 <= results[10][2] <= 60
    clock.now += 60  # next window: the last one's 10 hits still weigh fully at its start
    assert counters.hit("k", 10, 60)[0] is False
    clock.now += 30  # half of the last window still overlaps: 5 of its 10 hits count
    assert [counters.hit("k", 10, 60)[0] for _ in range(6)] == [True] * 5 + [False]
    clock.now += 120  # both windows passed
    assert counters.hit("k", 10, 60) == (True, 9, 60 - int(clock.now % 60))


def test_identities_are_separate_and_memory_is_bounded():
    counters = LocalCounters(max_identities=100, clock=Clock())
    for i in range(10_000):
        assert counters.hit(f"id{i}", 1, 60)[0]
    assert len(counters) == 100
    assert counters.hit("id9999", 1, 60)[0] is False

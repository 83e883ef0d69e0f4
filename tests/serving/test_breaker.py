"""The circuit breaker's state machine under an injected clock."""

from __future__ import annotations

import pytest

from torchgate.errors import CircuitOpen
from torchgate.serving.blame import CallerSpread
from torchgate.serving.breaker import BreakerState, CircuitBreaker

CLOSED, HALF_OPEN, OPEN = BreakerState.CLOSED, BreakerState.HALF_OPEN, BreakerState.OPEN


class Clock:
    def __init__(self) -> None:
        self.now = 500.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def changes() -> list[BreakerState]:
    return []


@pytest.fixture
def breaker(clock: Clock, changes: list[BreakerState]) -> CircuitBreaker:
    return CircuitBreaker(
        "flaky/1", failures=3, cooldown_s=30, probes=2, clock=clock, on_change=changes.append
    )


def fail(breaker: CircuitBreaker, times: int) -> None:
    for _ in range(times):
        breaker.allow()
        breaker.failure()


def test_closed_until_n_consecutive_failures(breaker: CircuitBreaker, changes) -> None:
    fail(breaker, 2)
    assert breaker.state is CLOSED and changes == []
    breaker.allow()
    breaker.failure()
    assert breaker.state is OPEN and changes == [OPEN]


def test_a_success_resets_the_count(breaker: CircuitBreaker, changes) -> None:
    for _ in range(4):
        fail(breaker, 2)
        breaker.allow()
        breaker.success()
    assert breaker.state is CLOSED and changes == []
    fail(breaker, 3)
    assert breaker.state is OPEN


def test_requests_without_a_verdict_neither_count_nor_reset(breaker: CircuitBreaker) -> None:
    fail(breaker, 2)
    for _ in range(10):  # client errors, load shed, cache hits
        breaker.allow()
        breaker.release()
    assert breaker.state is CLOSED
    fail(breaker, 1)
    assert breaker.state is OPEN


def test_open_refuses_at_once_with_the_cooldown_left(breaker: CircuitBreaker, clock) -> None:
    fail(breaker, 3)
    clock.advance(12.5)
    with pytest.raises(CircuitOpen) as refused:
        breaker.allow()
    assert refused.value.status_code == 503
    assert refused.value.retry_after_s == pytest.approx(17.5)
    assert refused.value.headers == {"Retry-After": "18"}
    assert "flaky/1" in refused.value.message
    clock.advance(17.4)
    with pytest.raises(CircuitOpen) as refused:
        breaker.allow()
    assert refused.value.headers == {"Retry-After": "1"}  # never 0
    assert breaker.state is OPEN


def test_half_open_after_the_cooldown_lets_probes_through_and_closes_on_success(
    breaker: CircuitBreaker, clock, changes
) -> None:
    fail(breaker, 3)
    clock.advance(30)
    assert breaker.state is HALF_OPEN
    assert changes == [OPEN, HALF_OPEN]
    breaker.allow()
    breaker.allow()  # probes=2
    with pytest.raises(CircuitOpen) as refused:
        breaker.allow()
    assert refused.value.headers == {"Retry-After": "1"}
    breaker.success()
    assert breaker.state is CLOSED
    assert changes == [OPEN, HALF_OPEN, CLOSED]
    for _ in range(5):
        breaker.allow()  # closed: no probe limit
    fail(breaker, 2)
    assert breaker.state is CLOSED  # the count started again from zero


def test_a_failed_probe_reopens_for_a_whole_cooldown(breaker: CircuitBreaker, clock, changes):
    fail(breaker, 3)
    clock.advance(31)
    breaker.allow()
    breaker.failure()
    assert breaker.state is OPEN
    assert changes == [OPEN, HALF_OPEN, OPEN]
    clock.advance(29.9)
    with pytest.raises(CircuitOpen) as refused:
        breaker.allow()
    assert refused.value.retry_after_s == pytest.approx(0.1)
    clock.advance(0.1)
    assert breaker.state is HALF_OPEN
    breaker.allow()
    breaker.success()
    assert changes == [OPEN, HALF_OPEN, OPEN, HALF_OPEN, CLOSED]


def test_release_frees_a_probe_slot(breaker: CircuitBreaker, clock) -> None:
    fail(breaker, 3)
    clock.advance(30)
    breaker.allow()
    breaker.allow()
    with pytest.raises(CircuitOpen):
        breaker.allow()
    breaker.release()  # one probe ended without a verdict (e.g. its client sent a bad row)
    breaker.allow()
    with pytest.raises(CircuitOpen):
        breaker.allow()
    assert breaker.state is HALF_OPEN
    breaker.release()
    breaker.release()
    breaker.release()  # more releases than probes never make room for more than `probes`
    breaker.allow()
    breaker.allow()
    with pytest.raises(CircuitOpen):
        breaker.allow()


def test_the_open_state_is_seen_without_a_request(clock, changes) -> None:
    """Readiness and /metrics read `state`; an expired cooldown shows as half-open there."""
    breaker = CircuitBreaker("m/1", failures=1, cooldown_s=5, clock=clock, on_change=changes.append)
    breaker.allow()
    breaker.failure()
    clock.advance(4.99)
    assert breaker.state is OPEN
    clock.advance(0.01)
    assert breaker.state is HALF_OPEN
    assert breaker.state is HALF_OPEN
    assert changes == [OPEN, HALF_OPEN]  # each transition reported once
    breaker.allow()
    with pytest.raises(CircuitOpen):
        breaker.allow()  # the default is one probe


def test_release_when_closed_changes_nothing(breaker: CircuitBreaker, changes) -> None:
    breaker.allow()
    breaker.release()
    assert breaker.state is CLOSED and changes == []


def test_suspect_failures_count_only_from_several_callers(clock: Clock, changes) -> None:
    breaker = CircuitBreaker(
        "m/1", failures=3, min_callers=3, clock=clock, on_change=changes.append
    )
    for _ in range(20):
        breaker.allow()
        assert not breaker.suspect("mallory")
    assert breaker.state is CLOSED
    counted = []
    for caller in ("ann", "bob", "cid"):  # mallory and ann are two; bob makes three
        breaker.allow()
        counted.append(breaker.suspect(caller))
    assert counted == [False, True, True] and breaker.state is CLOSED
    breaker.allow()
    assert breaker.suspect("mallory")  # now one caller's failure counts too
    assert breaker.state is OPEN and changes == [OPEN]


def test_suspect_callers_are_forgotten_after_a_minute(clock: Clock) -> None:
    spread = CallerSpread(min_callers=3, window_s=60, clock=clock)
    assert not spread.failed("ann")
    clock.advance(30)
    assert not spread.failed("bob")
    clock.advance(31)  # ann's failure is 61 s old
    assert not spread.failed("cid")
    assert spread.failed("ann")

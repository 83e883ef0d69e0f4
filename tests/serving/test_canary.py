"""`Canary` with an injected clock: sticky split, steps, promotion, rollbacks, manual moves."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry

from tests.support import metric
from torchgate.metrics import Metrics
from torchgate.serving.canary import Canary, CanaryStatus, bucket
from torchgate.serving.model_config import CanaryConfig


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def make(**policy: object) -> tuple[Canary, Metrics, Clock, list[int]]:
    metrics = Metrics(CollectorRegistry(), version="test")
    clock = Clock()
    promoted: list[int] = []
    settings = {"version": 2, "weight": 0.1, "min_requests": 20, **policy}
    canary = Canary(
        "m", 1, CanaryConfig(**settings), metrics=metrics, clock=clock, on_promote=promoted.append
    )
    return canary, metrics, clock, promoted


def text(metrics: Metrics) -> str:
    from prometheus_client import generate_latest

    return generate_latest(metrics.registry).decode()


def test_split_is_sticky_proportional_and_monotone_in_the_weight():
    canary, *_ = make()
    identities = [f"key-{i}" for i in range(5000)]
    chosen = {i: canary.choose(i) for i in identities}
    assert all(canary.choose(i) == chosen[i] for i in identities[:500])  # sticky
    share = sum(v == 2 for v in chosen.values()) / len(identities)
    assert 0.08 < share < 0.12
    at_tenth = {i for i, v in chosen.items() if v == 2}
    canary.set(0.5)
    at_half = {i for i in identities if canary.choose(i) == 2}
    assert at_tenth < at_half and 0.46 < len(at_half) / len(identities) < 0.54
    # the hash is stable across processes: a fixed value, not Python's salted hash()
    assert bucket("key-1", "m/2") == pytest.approx(bucket("key-1", "m/2"))
    assert 0 <= bucket("", "") < 1


def test_healthy_canary_steps_then_promotes():
    canary, metrics, _, promoted = make()
    for _ in range(19):
        canary.record(False, 0.01)
    assert canary.weight == 0.1
    canary.record(False, 0.01)
    assert canary.weight == 0.5 and canary.last.decision == "step"
    assert metric(text(metrics), "torchgate_canary_weight", model="m", version="2") == 0.5
    for _ in range(20):
        canary.record(False, 0.01)
    assert canary.status is CanaryStatus.PROMOTED and canary.weight == 1.0
    assert promoted == [2] and canary.stable == 2
    assert canary.choose("anyone") == 2 and not canary.routing
    t = text(metrics)
    assert metric(t, "torchgate_canary_weight", model="m", version="2") == 1.0
    assert metric(t, "torchgate_canary_decisions_total", model="m", decision="step") == 1
    assert metric(t, "torchgate_canary_decisions_total", model="m", decision="promote") == 1
    canary.record(True, 5.0)  # the rollout is over: outcomes no longer count
    assert canary.status is CanaryStatus.PROMOTED


def test_errors_roll_back_at_once_well_before_min_requests():
    canary, metrics, _, promoted = make(min_requests=200)
    recorded = 0
    while canary.status is CanaryStatus.ACTIVE and recorded < 200:
        canary.record(True, 0.01)
        recorded += 1
    assert recorded == 20  # as soon as the window holds a few outcomes, not after 200
    assert canary.status is CanaryStatus.ROLLED_BACK and canary.weight == 0
    assert canary.choose("anyone") == 1 and promoted == []
    assert "error rate" in canary.last.reason
    t = text(metrics)
    assert metric(t, "torchgate_canary_weight", model="m", version="2") == 0
    assert metric(t, "torchgate_canary_decisions_total", model="m", decision="rollback") == 1


def test_an_error_rate_just_over_the_bound_rolls_back():
    canary, *_ = make(min_requests=1000, max_error_rate=0.05)
    for i in range(300):
        canary.record(i % 10 == 0, 0.01)  # 10 % errors
        if canary.status is CanaryStatus.ROLLED_BACK:
            break
    assert canary.status is CanaryStatus.ROLLED_BACK and i < 30


def test_a_slow_p99_rolls_back():
    canary, *_ = make(min_requests=1000, max_p99_ms=200)
    for _ in range(150):
        canary.record(False, 0.05)
    assert canary.status is CanaryStatus.ACTIVE
    canary.record(False, 0.5)  # one slow among 151: p99 (nearest rank) is still 50 ms
    assert canary.status is CanaryStatus.ACTIVE
    canary.record(False, 0.6)
    assert canary.status is CanaryStatus.ROLLED_BACK
    assert "p99 500 ms over 200 ms" in canary.last.reason


def test_outcomes_older_than_the_window_are_forgotten():
    canary, _, clock, _ = make(min_requests=1000, window_s=60)
    for _ in range(15):
        canary.record(True, 0.01)
    clock.now += 61
    for _ in range(100):
        canary.record(False, 0.01)
    assert canary.status is CanaryStatus.ACTIVE
    state = canary.state()["window"]
    assert state["requests"] == 100 and state["errors"] == 0


def test_the_window_is_bounded():
    canary, *_ = make(min_requests=10_000)
    for _ in range(30_000):
        canary.record(False, 0.001)
    assert canary.state()["window"]["requests"] == 10_000


def test_manual_moves():
    canary, metrics, clock, promoted = make()
    canary.set(0)
    assert canary.status is CanaryStatus.PAUSED and canary.choose("x") == 1
    canary.record(True, 1.0)  # paused: not watched
    canary.set(0.5)
    assert canary.status is CanaryStatus.ACTIVE and canary.weight == 0.5
    canary.set(0.5, version=3)
    assert canary.version == 3
    with pytest.raises(ValueError, match="default version"):
        canary.set(0.5, version=1)
    with pytest.raises(ValueError, match="between 0 and 1"):
        canary.set(1.5)
    clock.now += 2
    state = canary.state()
    assert state["last_decision"]["decision"] == "manual"
    assert state["last_decision"]["seconds_ago"] == 2
    canary.set(1.0)
    assert canary.status is CanaryStatus.PROMOTED and promoted == [3] and canary.stable == 3
    t = text(metrics)
    assert metric(t, "torchgate_canary_decisions_total", model="m", decision="manual") == 4
    # moving to version 3 dropped version 2's weight series
    assert 'torchgate_canary_weight{model="m",version="2"}' not in t


def test_a_manual_resume_after_rollback_starts_a_fresh_window():
    canary, *_ = make()
    for _ in range(20):
        canary.record(True, 0.01)
    assert canary.status is CanaryStatus.ROLLED_BACK
    canary.set(0.1)
    canary.record(False, 0.01)
    assert canary.status is CanaryStatus.ACTIVE
    assert canary.state()["window"] == {
        "requests": 1,
        "errors": 0,
        "error_rate": 0.0,
        "p99_ms": 10.0,
        "since_step": 1,
    }


def test_policy_validation():
    with pytest.raises(ValueError, match="end at 1.0"):
        CanaryConfig(version=2, steps=(0.1, 0.5))
    with pytest.raises(ValueError, match="increasing"):
        CanaryConfig(version=2, steps=(0.5, 0.1, 1.0))


def test_failures_one_caller_alone_produces_never_roll_it_back():
    canary, *_ = make()
    for _ in range(19):
        canary.record(False, 0.01)
    for _ in range(200):
        canary.suspect("mallory", 0.01)  # the input's kind of failure, one caller
    window = canary.state()["window"]
    assert canary.status is CanaryStatus.ACTIVE and window["errors"] == 0
    canary.suspect("ann", 0.01)
    assert canary.status is CanaryStatus.ACTIVE
    canary.suspect("bob", 0.01)  # a third distinct caller: they count from now on
    assert canary.status is CanaryStatus.ROLLED_BACK

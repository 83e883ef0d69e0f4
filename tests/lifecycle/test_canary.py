"""`Canary` with an injected clock: the split by request share, gates relative to the
stable version, steps, promotion, rollbacks, manual moves and stored decisions."""

from __future__ import annotations

import random

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from tests.support import metric
from torchgate.lifecycle.canary import Canary, CanaryStatus
from torchgate.lifecycle.canary_gates import _binomial_limit
from torchgate.lifecycle.canary_split import RUN, bucket
from torchgate.lifecycle.rollout_state import RolloutRecord
from torchgate.metrics import Metrics
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
    return generate_latest(metrics.registry).decode()


def traffic(canary: Canary, requests: int, callers: int) -> float:
    """The canary's share of `requests` spread evenly over `callers` distinct callers."""
    sent = [canary.choose(f"caller-{i % callers}") for i in range(requests)]
    return sum(v == canary.version for v in sent) / requests


def run(
    canary: Canary, requests: int, canary_fails: float, stable_fails: float, seed: int
) -> int | None:
    """Requests from 20 callers with inputs that fail at the given rates on each side;
    the canary requests recorded when it was rolled back (None: it was not)."""
    rng = random.Random(seed)
    for i in range(requests):
        caller = f"c{i % 20}"
        number = canary.choose(caller)
        arm = canary.arm(number)
        rate = canary_fails if number == canary.version else stable_fails
        if rng.random() < rate:
            arm.suspect(caller, 0.002)  # the input's kind of failure: counts once spread
        else:
            arm.record(False, 0.002)
        if canary.status is CanaryStatus.ROLLED_BACK:
            return canary.state()["requests"]["canary"]
    return None


# the split ---------------------------------------------------------------------------------


@pytest.mark.parametrize("callers", [1, 20, 1000])
def test_the_weight_is_a_share_of_requests_whatever_the_callers(callers: int):
    for weight in (0.1, 0.5):
        canary, *_ = make(weight=weight)
        assert abs(traffic(canary, 2000, callers) - weight) < 0.03


def test_one_caller_gets_exactly_the_share_in_runs():
    canary, *_ = make()
    sent = [canary.choose("only") for _ in range(2000)]
    assert sum(v == 2 for v in sent) == 200
    runs = [sent[i : i + RUN] for i in range(0, len(sent), RUN)]
    assert all(len(set(r)) == 1 for r in runs)  # sticky within each run of 10
    # ...and spread out: one run in ten, never two in a row
    on_canary = [i for i, r in enumerate(runs) if r[0] == 2]
    assert all(b - a == 10 for a, b in zip(on_canary, on_canary[1:], strict=False))


def test_a_caller_with_few_requests_sees_one_version_and_the_split_is_stable():
    first, *_ = make()
    again, *_ = make()
    for i in range(500):
        seen = {first.choose(f"k{i}") for _ in range(RUN)}
        assert len(seen) == 1
        assert {again.choose(f"k{i}") for _ in range(RUN)} == seen  # the same in every process
    assert bucket("key-1", "m/2") == pytest.approx(bucket("key-1", "m/2"))
    assert 0 <= bucket("", "") < 1


def test_raising_the_weight_only_moves_first_runs_towards_the_canary():
    canary, *_ = make()
    identities = [f"key-{i}" for i in range(3000)]
    at_tenth = {i for i in identities if canary.choose(i) == 2}
    canary.set(0.5)
    at_half = {i for i in identities if canary.choose(i) == 2}  # a fresh count after set
    assert at_tenth < at_half and 0.46 < len(at_half) / len(identities) < 0.54


def test_the_callers_remembered_are_bounded():
    canary, *_ = make()
    for i in range(25_000):
        canary.choose(f"c{i}")
    assert len(canary._callers) == 10_000


# gates against the stable version ----------------------------------------------------------


@pytest.mark.slow
def test_an_identical_copy_failing_the_same_inputs_is_never_rolled_back():
    for seed in range(40):
        canary, *_ = make(min_requests=100_000)
        assert run(canary, 2000, 0.05, 0.05, seed) is None, seed
    for seed in range(5):  # ten times as long
        assert run(make(min_requests=5000)[0], 20_000, 0.05, 0.05, seed) is None
    canary, *_ = make(min_requests=200)  # steps up and is promoted, never rolled back
    assert run(canary, 5000, 0.05, 0.05, 1) is None and canary.status is CanaryStatus.PROMOTED


def test_a_copy_failing_ten_points_more_is_rolled_back_within_500_canary_requests():
    taken = [run(make(min_requests=100_000)[0], 20_000, 0.15, 0.05, seed) for seed in range(40)]
    assert all(t is not None and t <= 500 for t in taken), taken
    assert sorted(taken)[20] < 250  # typically within a couple of hundred


def test_a_broken_canary_is_rolled_back_after_the_minimum_sample():
    canary, metrics, _, promoted = make(min_requests=200)
    for _ in range(200):
        canary.stable_arm.record(False, 0.001)
    recorded = 0
    while canary.status is CanaryStatus.ACTIVE and recorded < 200:
        canary.canary_arm.record(True, 0.01)
        recorded += 1
    assert recorded == 20  # as soon as there is a sample, not after 200
    assert canary.status is CanaryStatus.ROLLED_BACK and canary.weight == 0
    assert canary.choose("anyone") == 1 and promoted == []
    assert "against the stable version's 0.000" in canary.last.reason
    t = text(metrics)
    assert metric(t, "torchgate_canary_weight", model="m", version="2") == 0
    assert metric(t, "torchgate_canary_decisions_total", model="m", decision="rollback") == 1


def test_without_stable_outcomes_the_canary_is_held_to_the_bound_alone():
    canary, *_ = make(min_requests=1000, max_error_rate=0.01)
    for i in range(300):
        canary.canary_arm.record(i % 10 == 0, 0.01)  # 10 % errors, no stable traffic
        if canary.status is CanaryStatus.ROLLED_BACK:
            break
    assert canary.status is CanaryStatus.ROLLED_BACK and 20 <= i < 200
    assert canary.last.reason.startswith("error rate 0.1")


def test_one_slow_request_among_twenty_never_decides():
    canary, *_ = make(min_requests=1000)
    for _ in range(300):
        canary.stable_arm.record(False, 0.010)
    for _ in range(19):
        canary.canary_arm.record(False, 0.010)
    canary.canary_arm.record(False, 2.0)
    assert canary.status is CanaryStatus.ACTIVE
    assert _binomial_limit(20, 0.01, 0.001) == 4  # it takes four of twenty


def test_a_canary_twice_as_slow_as_the_stable_version_is_rolled_back():
    canary, *_ = make(min_requests=1000)
    rng = random.Random(1)
    for i in range(3000):
        if i % 10:
            canary.stable_arm.record(False, rng.uniform(0.010, 0.020))
        else:
            canary.canary_arm.record(False, rng.uniform(0.020, 0.040))
        if canary.status is CanaryStatus.ROLLED_BACK:
            break
    assert canary.status is CanaryStatus.ROLLED_BACK
    assert "over 1.5 x the stable version's" in canary.last.reason


def test_the_same_latency_with_jitter_never_rolls_back():
    canary, *_ = make(min_requests=100_000)
    rng = random.Random(2)
    for _ in range(20_000):
        arm = canary.canary_arm if rng.random() < 0.1 else canary.stable_arm
        arm.record(False, rng.lognormvariate(-6, 0.5))  # about 2.5 ms, a long tail
    assert canary.status is CanaryStatus.ACTIVE


def test_a_p99_over_the_ceiling_rolls_back_whatever_the_stable_does():
    canary, *_ = make(min_requests=1000, max_p99_ms=200)
    for _ in range(150):
        canary.canary_arm.record(False, 0.05)
    for _ in range(7):
        canary.canary_arm.record(False, 0.5)
    assert canary.status is CanaryStatus.ACTIVE  # 7 of 157 could be a p99 under 200 ms
    canary.canary_arm.record(False, 0.5)
    assert canary.status is CanaryStatus.ROLLED_BACK
    assert "p99 500 ms over 200 ms (8 of 158 requests slower)" in canary.last.reason


def test_failures_one_caller_alone_produces_never_roll_it_back():
    canary, *_ = make()
    for _ in range(19):
        canary.canary_arm.record(False, 0.01)
    for _ in range(200):
        canary.canary_arm.suspect("mallory", 0.01)  # the input's kind of failure, one caller
    window = canary.state()["window"]
    assert canary.status is CanaryStatus.ACTIVE and window["errors"] == 0
    canary.canary_arm.suspect("ann", 0.01)
    canary.canary_arm.suspect("bob", 0.01)  # a third distinct caller: they count from now on
    for _ in range(10):
        canary.canary_arm.suspect("bob", 0.01)
    assert canary.status is CanaryStatus.ROLLED_BACK


def test_the_stable_window_covers_the_canary_window_s_time():
    canary, _, clock, _ = make(min_requests=1000, window_s=60)
    for _ in range(50):
        canary.stable_arm.record(True, 0.01)  # an old stretch of stable failures
    clock.now += 10
    for _ in range(30):
        canary.canary_arm.record(False, 0.01)
        canary.stable_arm.record(False, 0.01)
    state = canary.state()
    assert state["stable_window"]["requests"] == 30 and state["stable_window"]["errors"] == 0
    assert state["requests"] == {"canary": 30, "stable": 80}


def test_outcomes_older_than_the_window_are_forgotten():
    canary, _, clock, _ = make(min_requests=1000, window_s=60)
    for _ in range(15):
        canary.canary_arm.record(True, 0.01)
    clock.now += 61
    for _ in range(100):
        canary.canary_arm.record(False, 0.01)
    assert canary.status is CanaryStatus.ACTIVE
    state = canary.state()["window"]
    assert state["requests"] == 100 and state["errors"] == 0


def test_the_window_is_bounded():
    canary, *_ = make(min_requests=10_000)
    for _ in range(30_000):
        canary.canary_arm.record(False, 0.001)
    assert canary.state()["window"]["requests"] == 10_000


# steps, promotion, manual moves, stored decisions ------------------------------------------


def test_healthy_canary_steps_then_promotes():
    decided: list[str] = []
    canary, metrics, _, promoted = make()
    canary.on_decision = lambda c: decided.append(c.last.decision)
    for _ in range(19):
        canary.canary_arm.record(False, 0.01)
    assert canary.weight == 0.1
    canary.canary_arm.record(False, 0.01)
    assert canary.weight == 0.5 and canary.last.decision == "step"
    assert metric(text(metrics), "torchgate_canary_weight", model="m", version="2") == 0.5
    for _ in range(20):
        canary.canary_arm.record(False, 0.01)
    assert canary.status is CanaryStatus.PROMOTED and canary.weight == 1.0
    assert promoted == [2] and canary.stable == 2 and decided == ["step", "promote"]
    assert canary.choose("anyone") == 2 and not canary.routing
    t = text(metrics)
    assert metric(t, "torchgate_canary_weight", model="m", version="2") == 1.0
    assert metric(t, "torchgate_canary_decisions_total", model="m", decision="step") == 1
    assert metric(t, "torchgate_canary_decisions_total", model="m", decision="promote") == 1
    canary.canary_arm.record(True, 5.0)  # the rollout is over: outcomes no longer count
    assert canary.status is CanaryStatus.PROMOTED


def test_manual_moves():
    canary, metrics, clock, promoted = make()
    canary.set(0)
    assert canary.status is CanaryStatus.PAUSED and canary.choose("x") == 1
    canary.canary_arm.record(True, 1.0)  # paused: not watched
    canary.set(0.5)
    assert canary.status is CanaryStatus.ACTIVE and canary.weight == 0.5
    canary.set(0.5, version=3)
    assert canary.version == 3 and canary.arm(3) is canary.canary_arm
    with pytest.raises(ValueError, match="default version"):
        canary.set(0.5, version=1)
    with pytest.raises(ValueError, match="between 0 and 1"):
        canary.set(1.5)
    clock.now += 2
    state = canary.state()
    assert state["last_decision"]["decision"] == "manual"
    assert state["last_decision"]["seconds_ago"] == 2 and state["last_decision"]["made_here"]
    canary.set(1.0)
    assert canary.status is CanaryStatus.PROMOTED and promoted == [3] and canary.stable == 3
    t = text(metrics)
    assert metric(t, "torchgate_canary_decisions_total", model="m", decision="manual") == 4
    # moving to version 3 dropped version 2's weight series
    assert 'torchgate_canary_weight{model="m",version="2"}' not in t


def test_a_manual_resume_after_rollback_starts_a_fresh_window():
    canary, *_ = make()
    for _ in range(20):
        canary.canary_arm.record(True, 0.01)
    assert canary.status is CanaryStatus.ROLLED_BACK
    canary.set(0.1)
    canary.canary_arm.record(False, 0.01)
    assert canary.status is CanaryStatus.ACTIVE
    assert canary.state()["window"] == {
        "requests": 1,
        "errors": 0,
        "error_rate": 0.0,
        "p99_ms": 10.0,
        "since_step": 1,
    }


def _record(status: str, weight: float, generation: int = 3, canary: int = 2) -> RolloutRecord:
    return RolloutRecord(
        canary=canary,
        stable=1,
        status=status,
        weight=weight,
        decision="manual",
        reason="set by hand",
        generation=generation,
        at="2025-01-01T00:00:00+00:00",
        model_toml={"default_version": "latest", "canary": None},
    )


def test_a_stored_decision_is_taken_back_without_being_decided_again():
    decided: list[str] = []
    canary, metrics, _, promoted = make()
    canary.on_decision = lambda c: decided.append(c.last.decision)
    canary.adopt(_record("paused", 0.0))
    assert (canary.status, canary.weight, canary.generation) == (CanaryStatus.PAUSED, 0.0, 3)
    assert canary.state()["last_decision"]["made_here"] is False
    canary.adopt(_record("active", 0.5, canary=3))
    assert canary.version == 3 and canary.routing and canary.weight == 0.5
    canary.adopt(_record("promoted", 1.0, canary=3))
    assert canary.status is CanaryStatus.PROMOTED and canary.stable == 3 and promoted == [3]
    assert decided == []  # nothing recorded or counted again
    assert "torchgate_canary_decisions_total{" not in text(metrics)


def test_policy_validation():
    with pytest.raises(ValueError, match="end at 1.0"):
        CanaryConfig(version=2, steps=(0.1, 0.5))
    with pytest.raises(ValueError, match="increasing"):
        CanaryConfig(version=2, steps=(0.5, 0.1, 1.0))
    with pytest.raises(ValueError, match="greater than or equal to 1"):
        CanaryConfig(version=2, max_p99_ratio=0.5)

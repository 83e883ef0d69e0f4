"""`RolloutState`: records beside the model or in Redis, which record stands, and writes
that never block the event loop."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from tests.support import own_redis, redis_up
from torchgate.lifecycle.rollout_state import (
    FILE,
    FileStore,
    RedisStore,
    RolloutRecord,
    RolloutState,
    settings_of,
    settle,
)
from torchgate.serving.model_config import CanaryConfig, ModelConfig

CONFIG = ModelConfig.model_validate(
    {
        "inputs": [{"name": "x", "datatype": "FP32", "shape": [4]}],
        "outputs": [{"name": "y", "datatype": "FP32", "shape": [4]}],
        "canary": {"version": 2},
    }
)


def record(decision: str = "step", status: str = "active", generation: int = 0, **more):
    fields = {
        "canary": 2,
        "stable": 1,
        "status": status,
        "weight": 0.5,
        "decision": decision,
        "generation": generation,
        "model_toml": settings_of(CONFIG),
        **more,
    }
    return RolloutRecord(**fields)


def test_a_record_applies_while_model_toml_says_the_same():
    assert record().applies(CONFIG)
    assert not record().applies(CONFIG.model_copy(update={"default_version": 1}))
    changed = CONFIG.model_copy(update={"canary": CanaryConfig(version=2, weight=0.2)})
    assert not record().applies(changed)
    assert not record().applies(CONFIG.model_copy(update={"canary": None}))


def test_which_record_stands():
    active = record()
    assert settle(active, None) == active
    promoted = record("promote", "promoted", weight=1.0)
    assert settle(promoted, active) == promoted  # same generation, not concluded: replaced
    assert settle(record("step"), promoted) is None  # a lagging replica's step: promotion stands
    assert settle(record("rollback", "rolled_back"), promoted) is None  # the first conclusion
    by_hand = settle(record("manual", "paused", weight=0.0), promoted)
    assert by_hand is not None and by_hand.generation == 1  # a new generation, always written
    assert settle(record("step", generation=0), by_hand) is None  # older generation
    assert settle(record("step", generation=1), by_hand) is not None
    moved_on = record(model_toml={"default_version": 1, "canary": None})
    assert settle(moved_on, by_hand).generation == 2  # model.toml changed: start over


def test_the_file_beside_the_model(tmp_path: Path):
    (tmp_path / "m").mkdir()
    store = FileStore(tmp_path)
    assert store.read("m") is None
    stored = store.write("m", record())
    assert stored == record() and store.read("m") == record()
    assert json.loads((tmp_path / "m" / FILE).read_text())["status"] == "active"
    assert store.write("m", record("promote", "promoted", weight=1.0)).status == "promoted"
    assert store.write("m", record("step")).status == "promoted"  # stood
    assert [p.name for p in (tmp_path / "m").iterdir()] == [FILE]  # no temporary left


def test_an_unreadable_record_counts_as_none(tmp_path: Path, caplog):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / FILE).write_text('{"canary": "two"}')
    state = RolloutState(FileStore(tmp_path))
    assert state.read("m") is None
    assert any("unreadable" in r.getMessage() for r in caplog.records)


def test_writes_are_queued_in_order_off_the_loop(tmp_path: Path):
    (tmp_path / "m").mkdir()
    state = RolloutState(FileStore(tmp_path))
    seen: list[str | None] = []

    async def main() -> RolloutRecord | None:
        for weight in (0.1, 0.5):
            state.write("m", record(weight=weight), lambda n, r: seen.append(r and r.decision))
        state.write("m", record("promote", "promoted", weight=1.0), lambda n, r: None)
        last = await state.aread("m")  # after the writes queued before it
        await state.aclose()
        return last

    last = asyncio.run(main())
    assert last is not None and last.status == "promoted" and seen == ["step", "step"]


def test_a_failed_write_is_logged_not_raised(tmp_path: Path, caplog):
    state = RolloutState(FileStore(tmp_path / "gone"))
    called: list[object] = []

    async def main() -> None:
        state.write("m", record(), lambda n, r: called.append(r))
        await state.aclose()

    asyncio.run(main())
    assert called == []
    assert any("not recorded" in r.getMessage() for r in caplog.records)


@pytest.mark.skipif(not redis_up(), reason="needs Redis on 127.0.0.1:6379")
def test_redis_holds_one_record_for_every_replica():
    with own_redis() as (_, url):
        one, two = RedisStore(url), RedisStore(url)
        try:
            assert one.read("m") is None
            one.write("m", record("promote", "promoted", weight=1.0))
            assert two.read("m").status == "promoted"
            assert two.write("m", record("step")).status == "promoted"  # the promotion stands
            assert two.write("m", record("manual", "paused", weight=0.0)).generation == 1
            assert one.read("m").status == "paused"
        finally:
            one.close()
            two.close()


def test_an_unreachable_redis_counts_as_no_record(caplog):
    state = RolloutState(RedisStore("redis://127.0.0.1:1/0"))
    try:
        assert state.read("m") is None
    finally:
        state.close()
    assert any("unreachable" in r.getMessage() for r in caplog.records)

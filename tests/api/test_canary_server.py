"""A canary inside a real server, measured: its share of requests with 1, 20 and 1,000
callers, gates that hold an identical copy and roll back a worse one, and decisions that
outlive a restart and that replicas sharing Redis agree on."""

from __future__ import annotations

import json
import random
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis
import torch
from torch import nn

from tests.support import Doubler, ServerThread, doubler_toml, metric, own_redis, write_model
from torchgate.keys import key_file_entry
from torchgate.lifecycle.rollout_state import REDIS_PREFIX

pytestmark = pytest.mark.slow  # every test here takes a second or more

KEYS = [f"tg_caller_{i:04d}_" + "k" * 32 for i in range(1021)]
ADMIN_KEY = "tg_admin_" + "a" * 40
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}
ROW = [1.0, 2.0, 3.0, 4.0]
POISON, WORSE = 666.0, 665.0


class Picky(nn.Module):
    """A Doubler that fails rows holding 666 (as Doubler does) and rows holding 665 too:
    a copy that fails 10 % more of the inputs below."""

    def __init__(self) -> None:
        super().__init__()
        self.doubler = Doubler()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if bool((x == 665.0).any()):
            raise RuntimeError("worse than the stable version")
        return self.doubler(x)


def canary_toml(**canary: object) -> str:
    lines = [f"{k} = {v}" for k, v in {"version": 2, "weight": 0.1, **canary}.items()]
    return doubler_toml() + "[canary]\n" + "\n".join(lines) + "\n"


@pytest.fixture(scope="module")
def keys_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("keys") / "keys.toml"
    entries = [key_file_entry(f"c{i}", key, ["infer"]) for i, key in enumerate(KEYS)]
    path.write_text("".join(entries) + key_file_entry("ops", ADMIN_KEY, ["admin"]))
    return path


def serve(make_settings, repo: Path, keys_file: Path | None = None, **more) -> ServerThread:
    auth = {"auth": "on", "api_keys_file": keys_file} if keys_file else {}
    return ServerThread(make_settings(models=repo, cache_ttl_s=0, **auth, **more))


def inputs(seed: int) -> Iterator[list[float]]:
    """Rows of which 5 % fail on both versions (666) and 10 % only on Picky (665)."""
    rng = random.Random(seed)
    while True:
        draw = rng.random()
        first = POISON if draw < 0.05 else WORSE if draw < 0.15 else float(rng.randint(0, 9))
        yield [first, 2.0, 3.0, 4.0]


def canary_requests(c: httpx.Client, keys: list[str], rows: Iterator[list[float]], n: int):
    """Send `n` requests round the callers; yield, after each, whether the canary took it."""
    for i in range(n):
        headers = {"Authorization": f"Bearer {keys[i % len(keys)]}"}
        r = c.post("/v1/models/doubler:predict", json={"instances": [next(rows)]}, headers=headers)
        if r.status_code == 200:
            yield r.json()["model_version"] == "2"
        else:  # a failure names its model and version (batching.py)
            assert r.status_code == 500, r.text
            yield "doubler/2" in r.json()["error"]


def state(c: httpx.Client) -> dict:
    return c.get("/admin/models/doubler/canary", headers=ADMIN).json()


@pytest.mark.slow
def test_the_canary_takes_its_share_of_requests_with_1_20_and_1000_callers(
    tmp_path: Path, make_settings, keys_file: Path, record_property
):
    write_model(tmp_path, "doubler", Doubler(), canary_toml(min_requests=100_000), (1, 2))
    shares = {}
    with (
        serve(make_settings, tmp_path, keys_file) as server,
        httpx.Client(base_url=server.url, timeout=30) as c,
    ):
        for callers, keys in ((1, KEYS[:1]), (20, KEYS[1:21]), (1000, KEYS[21:1021])):
            rows = iter(lambda: ROW, None)
            taken = list(canary_requests(c, keys, rows, 2000))
            shares[callers] = sum(taken) / len(taken)
        assert state(c)["status"] == "active"
    record_property("canary_shares", shares)
    print(f"canary share of 2,000 requests at weight 0.1, by callers: {shares}")
    assert all(0.07 <= share <= 0.13 for share in shares.values()), shares


@pytest.mark.slow
def test_an_identical_copy_is_never_rolled_back_where_both_fail_5_percent(
    tmp_path: Path, make_settings, keys_file: Path
):
    write_model(tmp_path, "doubler", Doubler(), canary_toml(min_requests=1000), (1, 2))
    with (
        serve(make_settings, tmp_path, keys_file) as server,
        httpx.Client(base_url=server.url, timeout=30) as c,
    ):
        taken = 0
        for i, on_canary in enumerate(canary_requests(c, KEYS[:20], inputs(1), 2000)):
            taken += on_canary
            if i % 100 == 99:
                assert state(c)["status"] == "active", state(c)
        now = state(c)
        text = c.get("/metrics").text
    print(
        f"identical copy: {taken} of 2000 requests on it, {now['window']}, {now['stable_window']}"
    )
    assert now["status"] == "active" and now["weight"] == 0.1 and 140 <= taken <= 260
    # both sides saw the poisoned inputs fail, as failures of the model (several callers)
    assert 0.02 <= now["stable_window"]["error_rate"] <= 0.09
    assert now["window"]["errors"] > 0
    assert (
        metric(text, "torchgate_canary_decisions_total", model="doubler", decision="rollback") == 0
    )


@pytest.mark.slow
def test_a_copy_failing_10_percent_more_is_rolled_back_within_500_canary_requests(
    tmp_path: Path, make_settings, keys_file: Path
):
    folder = write_model(tmp_path, "doubler", Doubler(), canary_toml(), (1,))
    (folder / "2").mkdir()
    torch.jit.script(Picky()).save(str(folder / "2" / "model.pt"))
    with (
        serve(make_settings, tmp_path, keys_file) as server,
        httpx.Client(base_url=server.url, timeout=30) as c,
    ):
        taken = 0
        for i, on_canary in enumerate(canary_requests(c, KEYS[:20], inputs(2), 8000)):
            taken += on_canary
            if i % 10 == 9 and state(c)["status"] == "rolled_back":
                break
        now = state(c)
    print(f"worse copy rolled back after {taken} canary requests: {now['last_decision']}")
    assert now["status"] == "rolled_back" and taken <= 500
    assert "against the stable version's" in now["last_decision"]["reason"]


def promote(c: httpx.Client) -> int:
    """Requests from one caller (auth off: one address) until the canary is promoted."""
    for sent in range(1, 3000):
        assert c.post("/predict", json={"instances": [ROW]}).status_code == 200
        if sent % 10 == 0 and c.get("/admin/models/doubler/canary").json()["status"] == "promoted":
            return sent
    raise AssertionError("never promoted")


def test_a_promotion_survives_a_restart_and_deleting_the_record_resets_it(
    tmp_path: Path, make_settings
):
    folder = write_model(tmp_path, "doubler", Doubler(), canary_toml(min_requests=20), (1, 2))
    with serve(make_settings, tmp_path) as server, httpx.Client(base_url=server.url) as c:
        assert c.get("/v1/models/doubler").json()["default_version"] == "1"
        promote(c)
    record = json.loads((folder / "rollout.json").read_text())
    assert (record["status"], record["canary"], record["stable"]) == ("promoted", 2, 1)
    with serve(make_settings, tmp_path) as server, httpx.Client(base_url=server.url) as c:
        assert c.get("/v1/models/doubler").json()["default_version"] == "2"
        assert c.get("/admin/models/doubler/canary").json() == {
            "model": "doubler",
            "status": "none",
            "stable_version": 2,
        }
        assert {c.post("/predict", json={"instances": [ROW]}).json()["model_version"]} == {"2"}
        assert "torchgate_canary_weight{" not in c.get("/metrics").text
    (folder / "rollout.json").unlink()  # the reset the README describes
    with serve(make_settings, tmp_path) as server, httpx.Client(base_url=server.url) as c:
        assert c.get("/v1/models/doubler").json()["default_version"] == "1"
        assert c.get("/admin/models/doubler/canary").json()["weight"] == 0.1


def test_deleting_the_record_and_reloading_resets_the_rollout(tmp_path: Path, make_settings):
    folder = write_model(tmp_path, "doubler", Doubler(), canary_toml(min_requests=20), (1, 2))
    url, load = "/admin/models/doubler/canary", "/v2/repository/models/doubler/load"
    with (
        serve(make_settings, tmp_path, model_control="explicit") as server,
        httpx.Client(base_url=server.url) as c,
    ):
        assert c.post(url, json={"weight": 0.5}).json()["weight"] == 0.5
        assert c.post(load).status_code == 200
        assert c.get(url).json()["weight"] == 0.5  # kept: the record says so
        promote(c)
        assert c.post(load).json()["default_version"] == "2"
        assert c.get(url).json()["status"] == "none"
        (folder / "rollout.json").unlink()
        assert c.post(load).json()["default_version"] == "1"
        now = c.get(url).json()
        assert (now["status"], now["weight"], now["last_decision"]) == ("active", 0.1, None)


def test_manual_weights_and_rollbacks_survive_a_restart(tmp_path: Path, make_settings):
    write_model(tmp_path, "doubler", Doubler(), canary_toml(min_requests=100_000), (1, 2))
    url = "/admin/models/doubler/canary"
    with serve(make_settings, tmp_path) as server, httpx.Client(base_url=server.url) as c:
        assert c.post(url, json={"weight": 0.3}).json()["weight"] == 0.3
    with serve(make_settings, tmp_path) as server, httpx.Client(base_url=server.url) as c:
        now = c.get(url).json()
        assert (now["status"], now["weight"], now["generation"]) == ("active", 0.3, 1)
        assert now["last_decision"]["decision"] == "manual"
        assert now["last_decision"]["made_here"] is False
        assert c.post(url, json={"weight": 0}).json()["status"] == "paused"
    with serve(make_settings, tmp_path) as server, httpx.Client(base_url=server.url) as c:
        assert (c.get(url).json()["status"], c.get(url).json()["generation"]) == ("paused", 2)
        assert {c.post("/predict", json={"instances": [ROW]}).json()["model_version"]} == {"1"}


def test_replicas_sharing_redis_agree_on_a_promotion(tmp_path: Path, make_settings):
    one = write_model(tmp_path / "a", "doubler", Doubler(), canary_toml(min_requests=20), (1, 2))
    write_model(tmp_path / "b", "doubler", Doubler(), canary_toml(min_requests=20), (1, 2))
    with own_redis() as (_, redis_url):
        with (
            serve(make_settings, tmp_path / "a", redis_url=redis_url) as a,
            serve(make_settings, tmp_path / "b", redis_url=redis_url) as b,
            httpx.Client(base_url=a.url) as ca,
            httpx.Client(base_url=b.url) as cb,
        ):
            assert cb.get("/v1/models/doubler").json()["default_version"] == "1"
            promote(ca)  # replica a's traffic alone decides
            deadline = time.monotonic() + 15
            while cb.get("/v1/models/doubler").json()["default_version"] != "2":
                assert time.monotonic() < deadline, "replica b never followed"
                time.sleep(0.2)  # pacing: a poll
            followed = cb.get("/admin/models/doubler/canary").json()
            assert followed["status"] == "promoted" and not followed["last_decision"]["made_here"]
        stored = json.loads(redis.Redis.from_url(redis_url).get(REDIS_PREFIX + "doubler"))
        assert stored["status"] == "promoted"
        assert not (one / "rollout.json").exists()  # Redis holds it, not the files
        with (
            serve(make_settings, tmp_path / "b", redis_url=redis_url) as b,
            httpx.Client(base_url=b.url) as cb,
        ):
            assert cb.get("/v1/models/doubler").json()["default_version"] == "2"
            assert cb.get("/admin/models/doubler/canary").json()["status"] == "none"

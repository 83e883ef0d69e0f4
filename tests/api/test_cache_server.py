"""The inference cache seen through a real server: hits, TTL, Cache-Control, single flight,
row-level partial hits, both protocols, and the cache metrics."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

from tests.support import Doubler, ServerThread, doubler_toml, metric, slow_row, write_model
from torchgate.config import Settings

MODEL = {"model": "doubler", "version": "1"}


def row(i: float) -> list[float]:
    return [i, i + 0.5, -i, 1.0]


def v1(*rows: list[float]) -> dict:
    return {"instances": list(rows)}


def v2(*rows: list[float]) -> dict:
    data = [value for r in rows for value in r]
    return {"inputs": [{"name": "x", "shape": [len(rows), 4], "datatype": "FP32", "data": data}]}


class Probe:
    """Reads what the server computed and what its cache did from /metrics."""

    def __init__(self, client: httpx.Client) -> None:
        self.client = client

    def read(self) -> dict[str, float]:
        text = self.client.get("/metrics").text
        return {
            "rows": metric(text, "torchgate_batch_size_sum", **MODEL),
            "forwards": metric(text, "torchgate_compute_seconds_count", **MODEL),
            "hit": metric(text, "torchgate_cache_requests_total", model="doubler", result="hit"),
            "miss": metric(text, "torchgate_cache_requests_total", model="doubler", result="miss"),
            "entries": metric(text, "torchgate_cache_entries", model="doubler"),
        }


@pytest.fixture
def serve(tmp_path: Path, make_settings: Callable[..., Settings]):
    """Start a server on a repo holding the Doubler, with `model.toml` extra text."""

    def start(toml_extra: str = "", **settings: object) -> ServerThread:
        write_model(tmp_path, "doubler", Doubler(), doubler_toml() + toml_extra)
        return ServerThread(make_settings(models=tmp_path, **settings))

    return start


@pytest.fixture
def client(serve) -> Iterator[httpx.Client]:
    with serve() as server, httpx.Client(base_url=server.url, timeout=30) as client:
        yield client


def test_a_repeated_request_is_a_hit_with_the_same_answer(client: httpx.Client) -> None:
    probe = Probe(client)
    first = client.post("/predict", json=v1(row(1)))
    assert first.status_code == 200 and first.headers["x-cache"] == "MISS"
    assert first.json()["predictions"] == [[2 * v for v in row(1)]]
    second = client.post("/predict", json=v1(row(1)))
    assert second.status_code == 200 and second.headers["x-cache"] == "HIT"
    assert second.content == first.content
    seen = probe.read()
    assert seen["rows"] == 1 and seen["forwards"] == 1
    assert (seen["hit"], seen["miss"], seen["entries"]) == (1, 1, 1)
    assert client.post("/predict", json=v1(row(2))).headers["x-cache"] == "MISS"
    assert probe.read()["entries"] == 2


@pytest.mark.slow
@pytest.mark.parametrize("where", ["settings", "model.toml"])
def test_a_short_ttl_expires(serve, where: str) -> None:
    ttl = 1.0
    server = serve(cache_ttl_s=ttl) if where == "settings" else serve(f"[cache]\nttl_s = {ttl}\n")
    with server, httpx.Client(base_url=server.url, timeout=30) as client:
        probe = Probe(client)
        started = time.monotonic()
        assert client.post("/predict", json=v1(row(1))).headers["x-cache"] == "MISS"
        assert client.post("/predict", json=v1(row(1))).headers["x-cache"] == "HIT"
        assert time.monotonic() - started < ttl  # the hit above was inside the TTL
        assert probe.read()["entries"] == 1
        time.sleep(ttl + 0.1)  # pacing: past the TTL
        assert probe.read()["entries"] == 0
        assert client.post("/predict", json=v1(row(1))).headers["x-cache"] == "MISS"
        assert probe.read()["rows"] == 2


def test_a_zero_ttl_turns_the_cache_off(serve) -> None:
    with serve(cache_ttl_s=0) as server, httpx.Client(base_url=server.url) as client:
        for _ in range(2):
            answer = client.post("/predict", json=v1(row(1)))
            assert answer.status_code == 200 and "x-cache" not in answer.headers
        seen = Probe(client).read()
        assert seen["rows"] == 2 and (seen["hit"], seen["miss"], seen["entries"]) == (0, 0, 0)


@pytest.mark.parametrize(
    ("path", "body"),
    [("/predict", v1), ("/v2/models/doubler/infer", v2)],
    ids=["v1", "v2"],
)
def test_cache_control_no_store_and_no_cache(client: httpx.Client, path: str, body) -> None:
    probe = Probe(client)
    no_store, no_cache = {"Cache-Control": "no-store"}, {"Cache-Control": "no-cache"}

    answer = client.post(path, json=body(row(1)), headers=no_store)
    assert answer.status_code == 200 and "x-cache" not in answer.headers
    assert probe.read()["entries"] == 0  # not stored
    assert client.post(path, json=body(row(1))).headers["x-cache"] == "MISS"
    assert client.post(path, json=body(row(1)), headers=no_store).status_code == 200
    assert probe.read()["rows"] == 3  # no-store computed again although row 1 was cached

    answer = client.post(path, json=body(row(1)), headers=no_cache)
    assert answer.headers["x-cache"] == "MISS"  # cached, but not looked up
    assert probe.read()["rows"] == 4
    answer = client.post(path, json=body(row(2)), headers=no_cache)
    assert answer.headers["x-cache"] == "MISS"
    assert client.post(path, json=body(row(2))).headers["x-cache"] == "HIT"  # it was stored
    seen = probe.read()
    assert seen["rows"] == 5 and seen["entries"] == 2
    answer = client.post(path, json=body(row(2)), headers={"Cache-Control": "max-age=0"})
    assert answer.headers["x-cache"] == "MISS"


def test_50_concurrent_identical_requests_compute_once(client: httpx.Client) -> None:
    probe = Probe(client)
    body = v1(slow_row(4))  # about 200 ms of compute: the others arrive while it runs

    async def flood() -> list[httpx.Response]:
        limits = httpx.Limits(max_connections=50, max_keepalive_connections=50)
        async with httpx.AsyncClient(base_url=client.base_url, timeout=60, limits=limits) as c:
            return await asyncio.gather(*(c.post("/predict", json=body) for _ in range(50)))

    answers = asyncio.run(flood())
    assert {a.status_code for a in answers} == {200}
    assert {a.content for a in answers} == {answers[0].content}
    assert answers[0].json()["predictions"] == [[2 * v for v in slow_row(4)]]
    assert sorted(a.headers["x-cache"] for a in answers) == ["HIT"] * 49 + ["MISS"]
    seen = probe.read()
    assert seen["forwards"] == 1 and seen["rows"] == 1
    assert (seen["hit"], seen["miss"]) == (49, 1)


def test_only_the_missing_rows_are_computed_and_answers_keep_their_order(client) -> None:
    probe = Probe(client)
    assert client.post("/predict", json=v1(row(1), row(2))).headers["x-cache"] == "MISS"
    before = probe.read()
    rows = [row(3), row(1), row(4), row(2)]
    answer = client.post("/predict", json=v1(*rows))
    assert answer.status_code == 200 and answer.headers["x-cache"] == "PARTIAL"
    assert answer.json()["predictions"] == [[2 * v for v in r] for r in rows]
    after = probe.read()
    assert after["rows"] - before["rows"] == 2
    assert after["forwards"] - before["forwards"] == 1
    assert (after["hit"] - before["hit"], after["miss"] - before["miss"]) == (2, 2)
    assert after["entries"] == 4
    answer = client.post("/predict", json=v1(*reversed(rows)))
    assert answer.headers["x-cache"] == "HIT"
    assert answer.json()["predictions"] == [[2 * v for v in r] for r in reversed(rows)]


def test_v1_and_v2_share_one_cache(client: httpx.Client) -> None:
    probe = Probe(client)
    answer = client.post("/v1/models/doubler:predict", json=v1(row(1)))
    assert answer.headers["x-cache"] == "MISS"
    assert client.post("/predict", json=v1(row(1))).headers["x-cache"] == "HIT"
    answer = client.post("/v2/models/doubler/infer", json=v2(row(1)))
    assert answer.status_code == 200 and answer.headers["x-cache"] == "HIT"
    assert answer.json()["outputs"][0]["data"] == [2 * v for v in row(1)]

    answer = client.post("/v2/models/doubler/versions/1/infer", json=v2(row(2), row(1)))
    assert answer.headers["x-cache"] == "PARTIAL"
    output = answer.json()["outputs"][0]
    assert output["shape"] == [2, 4]
    np.testing.assert_array_equal(
        np.reshape(output["data"], (2, 4)), 2 * np.array([row(2), row(1)])
    )
    answer = client.post("/v1/models/doubler/versions/1:predict", json=v1(row(2)))
    assert answer.headers["x-cache"] == "HIT"
    assert answer.json()["predictions"] == [[2 * v for v in row(2)]]
    seen = probe.read()
    assert seen["rows"] == 2 and (seen["hit"], seen["miss"], seen["entries"]) == (4, 2, 2)


def test_failures_and_refusals_are_not_cached(client: httpx.Client) -> None:
    probe = Probe(client)
    poisoned = v1(row(1), [666.0, 0.0, 0.0, 0.0])
    for _ in range(2):
        assert client.post("/predict", json=poisoned).status_code == 500
    assert client.post("/predict", json=v1([1.0, 2.0])).status_code == 400
    seen = probe.read()
    assert seen["entries"] == 0 and seen["hit"] == 0
    assert client.post("/predict", json=v1(row(1))).headers["x-cache"] == "MISS"

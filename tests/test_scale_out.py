"""Scale-out: three `torchgate serve` processes sharing one Redis enforce one rate limit and
share cached rows; with Redis gone, each replica keeps serving from its own cache."""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
import torch

from tests.support import (
    Doubler,
    ServerThread,
    doubler_toml,
    metric,
    own_redis,
    redis_up,
    server_process,
    write_model,
)
from torchgate.config import Settings
from torchgate.keys import key_file_entry

pytestmark = pytest.mark.slow  # replicas sharing a Redis of their own

REDIS_URL = "redis://127.0.0.1:6379/0"
LIMIT = 15


class Salted(Doubler):
    """The Doubler with a random, unused buffer: a model file (so cache keys) that no earlier
    run left in the shared Redis."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("salt", torch.rand(4))


def row(i: float) -> list[float]:
    return [i, i + 0.5, -i, 1.0]


def doubled(r: list[float]) -> list[float]:
    return [2 * v for v in r]


@contextmanager
def replicas(count: int, *args: str, env: dict[str, str]) -> Iterator[list[str]]:
    """`count` server processes started (and later stopped) in parallel; their URLs."""
    managers = [server_process(*args, env=env) for _ in range(count)]
    with ThreadPoolExecutor(count) as pool:
        starts = [pool.submit(m.__enter__) for m in managers]
        entered, urls, failure = [], [], None
        for manager, start in zip(managers, starts, strict=True):
            try:
                urls.append(start.result()[1])
                entered.append(manager)
            except Exception as exc:
                failure = failure or exc
        try:
            if failure is not None:
                raise failure
            yield urls
        finally:
            list(pool.map(lambda m: m.__exit__(None, None, None), entered))


class Cluster:
    def __init__(self, urls: list[str], limited_key: str, cache_key: str) -> None:
        self.urls = urls
        self.limited = {"Authorization": f"Bearer {limited_key}"}
        self.cached = {"Authorization": f"Bearer {cache_key}"}

    def metrics(self, url: str) -> str:
        return httpx.get(url + "/metrics", headers=self.cached).text


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    assert redis_up(6379), "the tests need Redis on 127.0.0.1:6379 (.ci/run starts it)"
    root = tmp_path_factory.mktemp("scale_out")
    write_model(root / "models", "doubler", Salted(), doubler_toml())
    run = uuid.uuid4().hex[:12]  # key names are rate-limit identities in the shared Redis
    limited_key, cache_key = f"tg_limited_{uuid.uuid4().hex}", f"tg_cache_{uuid.uuid4().hex}"
    keys_file = root / "keys.toml"
    keys_file.write_text(
        key_file_entry(f"limited-{run}", limited_key, ["infer"])
        + key_file_entry(f"cache-{run}", cache_key, ["infer"], "1000/minute")
    )
    env = {
        "TORCHGATE_API_KEYS_FILE": str(keys_file),
        "TORCHGATE_RATE_LIMIT": f"{LIMIT}/minute",
        "TORCHGATE_REDIS_URL": REDIS_URL,
    }
    with pytest.MonkeyPatch.context() as patch:  # the children see only the settings above
        for name in list(os.environ):
            if name.startswith("TORCHGATE_"):
                patch.delenv(name)
        with replicas(3, "--models", str(root / "models"), env=env) as urls:
            patch.undo()
            yield Cluster(urls, limited_key, cache_key)


def test_replicas_sharing_redis_enforce_one_rate_limit(cluster: Cluster) -> None:
    codes, refused_by = [], []
    for i in range(LIMIT + 3):
        url = cluster.urls[(i + 1) % 3]  # round-robin, starting on the second replica
        answer = httpx.post(url + "/predict", json={"instances": [row(0)]}, headers=cluster.limited)
        codes.append(answer.status_code)
        if answer.status_code == 429:
            refused_by.append(url)
            assert answer.headers["retry-after"].isdigit()
            assert answer.headers["ratelimit-remaining"] == "0"
    assert codes == [200] * LIMIT + [429] * 3  # exactly the 16th overall, on any replica
    assert sorted(refused_by) == sorted(cluster.urls)  # each replica refused one
    for url in cluster.urls:
        text = cluster.metrics(url)
        assert metric(text, "torchgate_ratelimit_rejections_total", policy="default") == 1
        assert metric(text, "torchgate_ratelimit_backend_errors_total") == 0


def test_a_row_computed_on_one_replica_is_a_hit_on_the_others(cluster: Cluster) -> None:
    def post(url: str, *rows: list[float]) -> httpx.Response:
        answer = httpx.post(
            url + "/predict", json={"instances": list(rows)}, headers=cluster.cached
        )
        assert answer.status_code == 200, answer.text
        assert answer.json()["predictions"] == [doubled(r) for r in rows]
        return answer

    def rows_computed(url: str) -> float:
        text = cluster.metrics(url)
        return metric(text, "torchgate_batch_size_sum", model="doubler", version="1")

    before = [rows_computed(url) for url in cluster.urls]
    for i, origin in enumerate(cluster.urls):
        r = row(100 + i)
        assert post(origin, r).headers["x-cache"] == "MISS"
        for other in cluster.urls:
            if other != origin:
                assert post(other, r).headers["x-cache"] == "HIT"
    # one new row and two that other replicas computed: only the new one is computed here
    answer = post(cluster.urls[0], row(103), row(101), row(102))
    assert answer.headers["x-cache"] == "PARTIAL"
    after = [rows_computed(url) for url in cluster.urls]
    assert [a - b for a, b in zip(after, before, strict=True)] == [2, 1, 1]
    for url in cluster.urls:
        text = cluster.metrics(url)
        assert metric(text, "torchgate_cache_backend_errors_total") == 0
        assert metric(text, "torchgate_cache_requests_total", model="doubler", result="hit") >= 2


def test_with_redis_gone_each_replica_serves_from_its_own_cache(
    tmp_path: Path, make_settings: Callable[..., Settings]
) -> None:
    write_model(tmp_path, "doubler", Doubler(), doubler_toml())
    with own_redis() as (redis, url):
        settings = make_settings(models=tmp_path, redis_url=url)
        with ServerThread(settings) as a, ServerThread(settings) as b:

            def post(server: ServerThread, r: list[float]) -> str:
                answer = httpx.post(server.url + "/predict", json={"instances": [r]}, timeout=30)
                assert answer.status_code == 200, answer.text
                assert answer.json()["predictions"] == [doubled(r)]
                return answer.headers["x-cache"]

            def errors(server: ServerThread) -> float:
                text = httpx.get(server.url + "/metrics").text
                return metric(text, "torchgate_cache_backend_errors_total")

            assert post(a, row(1)) == "MISS"
            assert post(b, row(1)) == "HIT"  # shared through Redis
            assert errors(a) == errors(b) == 0

            redis.terminate()
            redis.wait(timeout=10)

            assert post(a, row(2)) == "MISS"
            assert errors(a) >= 1
            assert post(a, row(2)) == "HIT"  # kept in process
            assert post(b, row(2)) == "MISS"  # nothing is shared now
            assert post(b, row(2)) == "HIT"
            assert post(b, row(1)) == "HIT"  # what came from Redis before is still held
            assert errors(b) >= 1
            seen = errors(a)
            # past the pause after a failure, Redis is tried again, and fails
            time.sleep(1.1)  # pacing: the pause is a second
            assert post(a, row(3)) == "MISS"
            assert errors(a) > seen
            assert post(a, row(3)) == "HIT"

"""The dynamic batcher seen through a real server: batching, shedding, deadlines, isolation,
client disconnects and a graceful drain on SIGTERM."""

from __future__ import annotations

import asyncio
import signal
import socket
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch

from tests.support import (
    Doubler,
    ServerThread,
    doubler_toml,
    eventually,
    metric,
    server_process,
    slow_row,
    started,
    until_metric,
    until_started,
    write_model,
)

pytestmark = pytest.mark.slow  # every test here takes a second or more


INFLIGHT = "torchgate_inflight_requests"  # every HTTP request, the scrape included
DOUBLER_V1 = {"model": "doubler", "version": "1"}


def row(i: float) -> list[float]:
    return [i, i + 0.5, -i, 1.0]


async def post_many(url: str, bodies: list[dict], path: str = "/predict") -> list[httpx.Response]:
    limits = httpx.Limits(max_connections=len(bodies), max_keepalive_connections=len(bodies))
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as client:
        return await asyncio.gather(*(client.post(path, json=b) for b in bodies))


@pytest.fixture
def doubler_server(tmp_path: Path, make_settings):
    def start(**batching: object) -> ServerThread:
        write_model(tmp_path, "doubler", Doubler(), doubler_toml(**batching))
        return ServerThread(make_settings(models=tmp_path, cache_ttl_s=0))

    return start


def test_64_concurrent_single_rows_are_batched_and_each_gets_its_own_answer(
    tmp_path, make_settings
):
    from tests.support import copy_digits

    copy_digits(tmp_path)
    x = np.load(tmp_path / "digits" / "validation.npz")["x"][:64]
    module = torch.jit.load(str(tmp_path / "digits" / "1" / "model.pt"))
    with torch.inference_mode():
        expected = module(torch.from_numpy(x)).numpy()
    with ServerThread(make_settings(models=tmp_path, cache_ttl_s=0)) as server:
        for _ in range(3):  # three waves of 64 concurrent requests, all computed
            answers = asyncio.run(post_many(server.url, [{"instances": [r.tolist()]} for r in x]))
            for i, answer in enumerate(answers):
                assert answer.status_code == 200
                got = np.array(answer.json()["predictions"][0])
                np.testing.assert_allclose(got, expected[i], rtol=1e-4, atol=1e-4)
        text = httpx.get(server.url + "/metrics").text
    forwards = metric(text, "torchgate_batch_size_count", model="digits", version="1")
    rows = metric(text, "torchgate_batch_size_sum", model="digits", version="1")
    assert rows == 3 * 64
    assert forwards < rows  # some forwards carried more than one row
    assert (
        metric(text, "torchgate_batch_size_bucket", model="digits", version="1", le="1.0")
        < forwards
    )


def test_flood_beyond_the_queue_gets_503_with_retry_after_and_nothing_else(doubler_server):
    with doubler_server(max_queue_rows=16) as server:
        bodies = [{"instances": [slow_row(30)]}] + [{"instances": [row(i)]} for i in range(80)]

        async def flood() -> list[httpx.Response]:
            async with httpx.AsyncClient(
                base_url=server.url, timeout=60, limits=httpx.Limits(max_connections=100)
            ) as client:
                before = await started(client, "doubler")
                first = asyncio.create_task(client.post("/predict", json=bodies[0]))
                await until_started(client, "doubler", before + 1)  # it holds the runner
                rest = await asyncio.gather(*(client.post("/predict", json=b) for b in bodies[1:]))
                return [await first, *rest]

        answers = asyncio.run(flood())
        codes = [a.status_code for a in answers]
        assert set(codes) <= {200, 503}
        shed = [a for a in answers if a.status_code == 503]
        assert len(shed) >= 40  # 16 rows fit in the queue while the slow forward runs
        assert all(a.headers["retry-after"].isdigit() for a in shed)
        assert all("overloaded" in a.json()["error"] for a in shed)
        for i, answer in enumerate(answers[1:]):
            if answer.status_code == 200:
                assert answer.json()["predictions"] == [[2 * v for v in row(i)]]
        after = httpx.post(server.url + "/predict", json={"instances": [row(3)]})
        assert after.status_code == 200
        text = httpx.get(server.url + "/metrics").text
        # refused at admission (before the body is read) or, past it, by the full queue
        refused = sum(
            metric(text, "torchgate_shed_total", model="doubler", reason=reason)
            for reason in ("queue_full", "overloaded")
        )
        assert refused == len(shed)


def test_queued_request_past_its_deadline_gets_504(doubler_server):
    with doubler_server(timeout_ms=150) as server:

        async def go() -> list[httpx.Response]:
            async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:
                before = await started(client, "doubler")
                first = asyncio.create_task(
                    client.post("/predict", json={"instances": [slow_row(20)]})
                )
                await until_started(client, "doubler", before + 1)  # it holds the runner
                late = await client.post("/predict", json={"instances": [row(1)]})
                return [await first, late]

        slow, late = asyncio.run(go())
        # the slow one outlasts its deadline while computing: answered at the deadline too
        assert slow.status_code == 504 and "computed" in slow.json()["error"]
        assert late.status_code == 504 and "queue" in late.json()["error"]
        # the slow forward still ends (its answer goes nowhere); the late one never ran
        deadline = time.monotonic() + 30
        while True:
            text = httpx.get(server.url + "/metrics").text
            count = metric(text, "torchgate_batch_size_count", model="doubler", version="1")
            if count or time.monotonic() > deadline:
                break
            time.sleep(0.05)  # pacing
        assert count == 1


def test_a_poisoned_row_fails_alone_while_its_batch_neighbours_succeed(doubler_server):
    with doubler_server() as server:

        async def go() -> list[httpx.Response]:
            async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:
                before = await started(client, "doubler")
                first = asyncio.create_task(
                    client.post("/predict", json={"instances": [slow_row(10)]})
                )
                await until_started(client, "doubler", before + 1)  # it holds the runner
                bodies = [{"instances": [row(i)]} for i in range(10)]
                bodies[4] = {"instances": [[666.0, 0, 0, 0]]}
                rest = await asyncio.gather(*(client.post("/predict", json=b) for b in bodies))
                return [await first, *rest]

        answers = asyncio.run(go())
        codes = [a.status_code for a in answers]
        assert codes == [200] * 5 + [500] + [200] * 5
        error = answers[5].json()["error"]
        assert "doubler/1" in error and "Traceback" not in error and ".py" not in error
        text = httpx.get(server.url + "/metrics").text
        # the poisoned row shared a batch with neighbours: that batch failed and was retried
        # one request at a time
        assert metric(text, "torchgate_batch_retries_total", model="doubler", version="1") == 1
        assert httpx.post(server.url + "/predict", json={"instances": [row(1)]}).status_code == 200


def test_client_that_disconnects_before_its_batch_runs_is_not_computed(doubler_server):
    with doubler_server() as server:
        body = b'{"instances": [[1, 2, 3, 4]]}'

        async def go() -> httpx.Response:
            async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:
                before = await started(client, "doubler")
                first = asyncio.create_task(
                    client.post("/predict", json={"instances": [slow_row(20)]})
                )
                await until_started(client, "doubler", before + 1)  # it holds the runner
                sock = socket.create_connection(("127.0.0.1", server.port))
                sock.sendall(
                    b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                    + f"Content-Length: {len(body)}\r\n\r\n".encode()
                    + body
                )
                await until_metric(
                    client, "torchgate_queue_rows", lambda n: n == 1, 30, **DOUBLER_V1
                )
                sock.close()
                return await first

        assert asyncio.run(go()).status_code == 200
        # every request has ended (the scrape aside): had the dropped one run, it would count
        eventually(lambda: metric(httpx.get(server.url + "/metrics").text, INFLIGHT) == 1)
        text = httpx.get(server.url + "/metrics").text
        assert metric(text, "torchgate_batch_size_count", model="doubler", version="1") == 1
        assert metric(text, "torchgate_batch_size_sum", model="doubler", version="1") == 1


def test_sigterm_with_50_requests_queued_answers_all_and_exits_0(tmp_path):
    write_model(tmp_path, "doubler", Doubler(), doubler_toml(max_delay_ms=1500))
    with server_process("--models", str(tmp_path), "--no-auth") as (proc, url):

        async def go() -> list[httpx.Response]:
            limits = httpx.Limits(max_connections=60)
            async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as client:
                tasks = [
                    asyncio.create_task(client.post("/predict", json={"instances": [row(i)]}))
                    for i in range(50)
                ]
                # all 50 sit in the batcher, waiting for company (and the scrape is in flight)
                await until_metric(client, INFLIGHT, lambda n: n >= 51, 30)
                proc.send_signal(signal.SIGTERM)
                return await asyncio.gather(*tasks)

        answers = asyncio.run(go())
        assert [a.status_code for a in answers] == [200] * 50
        for i, answer in enumerate(answers):
            assert answer.json()["predictions"] == [[2 * v for v in row(i)]]
        assert proc.wait(timeout=30) == 0
        with pytest.raises(httpx.TransportError):
            httpx.get(url + "/health", timeout=2)

"""Overload against real servers: a request past its model's limit is refused before its
body is read, the server's own bound holds, and deadlines count from arrival."""

from __future__ import annotations

import asyncio
import socket
import time

import httpx
import pytest

from tests.support import Doubler, ServerThread, doubler_toml, metric, slow_row, write_model

pytestmark = pytest.mark.slow  # every test here takes a second or more

SLOW = {"instances": [slow_row(20)]}


async def _until_inflight(client: httpx.AsyncClient, count: int) -> None:
    """Until `count` requests are inside the server (the gauge counts /metrics itself) and
    none waits in the queue (the runner has taken what it can)."""
    deadline = time.monotonic() + 30
    while True:
        text = (await client.get("/metrics")).text
        inside = metric(text, "torchgate_inflight_requests") - 1
        queued = metric(text, "torchgate_queue_rows", model="doubler", version="1")
        if inside >= count and queued <= count - 1:
            return
        assert time.monotonic() < deadline, "the requests never got in"
        await asyncio.sleep(0.01)  # pacing


def test_a_request_past_the_limit_is_refused_before_its_body_is_read(tmp_path, make_settings):
    # one row a batch, one queued: at most two requests of this model in the server
    write_model(tmp_path, "doubler", Doubler(), doubler_toml(max_batch_size=1, max_queue_rows=1))
    with ServerThread(make_settings(models=tmp_path, cache_ttl_s=0)) as server:

        async def go() -> tuple[list[httpx.Response], httpx.Response]:
            async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:
                held = [asyncio.create_task(client.post("/predict", json=SLOW))]
                await _until_inflight(client, 1)  # the runner takes it: the queue is free
                held.append(asyncio.create_task(client.post("/predict", json=SLOW)))
                await _until_inflight(client, 2)
                # a malformed body: read, it would be a 400; refused first, it is a 503
                refused = await client.post(
                    "/predict", content=b"{not json", headers={"content-type": "application/json"}
                )
                return await asyncio.gather(*held), refused

        held, refused = asyncio.run(go())
        assert [a.status_code for a in held] == [200, 200]
        assert refused.status_code == 503 and "overloaded" in refused.json()["error"]
        assert int(refused.headers["retry-after"]) >= 1
        text = httpx.get(server.url + "/metrics").text
        assert metric(text, "torchgate_shed_total", model="doubler", reason="overloaded") == 1
        assert (
            httpx.post(server.url + "/predict", json={"instances": [[1, 2, 3, 4]]}).status_code
            == 200
        )


def test_the_server_bound_on_requests_in_flight(tmp_path, make_settings):
    write_model(tmp_path, "doubler", Doubler(), doubler_toml())
    settings = make_settings(models=tmp_path, cache_ttl_s=0, max_inflight=2)
    with ServerThread(settings) as server:

        async def go() -> tuple[list[httpx.Response], httpx.Response, httpx.Response]:
            async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:
                held = [asyncio.create_task(client.post("/predict", json=SLOW)) for _ in range(2)]
                await _until_inflight(client, 2)
                third = await client.post("/predict", json={"instances": [[1, 2, 3, 4]]})
                probe = await client.get("/health")  # probes are never refused
                return await asyncio.gather(*held), third, probe

        held, third, probe = asyncio.run(go())
        assert [a.status_code for a in held] == [200, 200]
        assert third.status_code == 503 and "limit of 2 requests in flight" in third.json()["error"]
        assert probe.status_code == 200


def test_the_deadline_counts_from_arrival(tmp_path, make_settings):
    """A body that takes longer than the model's deadline to arrive is answered 504 as soon
    as it has arrived, without being computed."""
    write_model(tmp_path, "doubler", Doubler(), doubler_toml(timeout_ms=300))
    with ServerThread(make_settings(models=tmp_path, cache_ttl_s=0)) as server:
        body = b'{"instances": [[1, 2, 3, 4]]}'
        with socket.create_connection(("127.0.0.1", server.port)) as sock:
            sock.sendall(
                b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                + f"Content-Length: {len(body)}\r\n\r\n".encode()
                + body[:10]
            )
            time.sleep(0.5)  # pacing: the body trickles past the deadline
            sock.sendall(body[10:])
            sock.settimeout(10)
            answer = sock.recv(65536)
        assert answer.startswith(b"HTTP/1.1 504"), answer[:200]
        assert b"before it reached" in answer
        text = httpx.get(server.url + "/metrics").text
        assert metric(text, "torchgate_batch_size_count", model="doubler", version="1") == 0

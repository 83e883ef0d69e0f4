"""The security review's findings, each reproduced against a real server: what a client
with an ordinary key could do before, and what it gets now."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import socket
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from torch import nn

from tests.api.test_text_inputs import TOML as TEXT_TOML
from tests.api.test_text_inputs import TextLength
from tests.support import (
    Doubler,
    ServerThread,
    doubler_toml,
    server_process,
    write_model,
)
from torchgate.errors import ModelLoadError
from torchgate.keys import key_file_entry
from torchgate.serving.repository import ModelRepository

HEADER_LENGTH = "Inference-Header-Content-Length"
KEY_A = "tg_alice_" + "a" * 40
KEY_B = "tg_bob_" + "b" * 40


def peak_rss(pid: int) -> int:
    """The process's peak resident set (VmHWM), in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


class HealthProbe:
    """Polls /health from a thread while an attack runs; the slowest answer it saw."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.latencies: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def _poll(self) -> None:
        with httpx.Client(timeout=30) as client:
            while not self._stop.is_set():
                started = time.perf_counter()
                assert client.get(self.url + "/health").status_code == 200
                self.latencies.append(time.perf_counter() - started)
                self._stop.wait(0.005)  # pacing

    def _wait_for(self, count: int) -> None:
        deadline = time.monotonic() + 30
        while len(self.latencies) < count:
            assert time.monotonic() < deadline and self._thread.is_alive(), "/health is stuck"
            time.sleep(0.005)  # pacing

    def __enter__(self) -> HealthProbe:
        self._thread.start()
        self._wait_for(1)
        return self

    def __exit__(self, *exc: object) -> None:
        self._wait_for(len(self.latencies) + 2)  # answers after the attack, too
        self._stop.set()
        self._thread.join()


def binary_request(shape: list[int], size: int) -> tuple[bytes, dict[str, str]]:
    tensor = {"name": "text", "shape": shape, "datatype": "BYTES"}
    header = json.dumps({"inputs": [{**tensor, "parameters": {"binary_data_size": size}}]})
    return header.encode(), {HEADER_LENGTH: str(len(header))}


@pytest.fixture(scope="module")
def text_repo(tmp_path_factory) -> Path:
    repo = tmp_path_factory.mktemp("repo")
    write_model(repo, "textlen", TextLength(), TEXT_TOML)  # BYTES [1] per row
    variable = TEXT_TOML.replace("shape = [1]\n[[outputs]]", "shape = [-1]\n[[outputs]]")
    write_model(repo, "textany", TextLength(), variable)  # any number of strings per row
    write_model(repo, "doubler", Doubler(), doubler_toml())
    return repo


@pytest.mark.slow
def test_a_112_byte_request_allocates_nothing_and_the_loop_keeps_answering(text_repo):
    with (
        server_process("--models", str(text_repo), "--no-auth") as (proc, url),
        httpx.Client(base_url=url, timeout=30) as client,
    ):
        assert client.post("/v1/models/textlen:predict", json={"instances": [["hi"]]}).is_success
        before = peak_rss(proc.pid)
        # the review's request: 268,435,456 BYTES elements declared, none sent
        body, headers = binary_request([268435456], 0)
        assert len(body) == 112
        with HealthProbe(url) as probe:
            for _ in range(10):
                answer = client.post("/v2/models/textlen/infer", content=body, headers=headers)
                assert answer.status_code == 400
                assert "does not match the model's [-1, 1]" in answer.json()["error"]
                # a model whose signature takes any number of strings per row
                body2, headers2 = binary_request([1, 268435456], 0)
                answer = client.post("/v2/models/textany/infer", content=body2, headers=headers2)
                assert answer.status_code == 400
                assert "cannot hold 268435456 BYTES elements" in answer.json()["error"]
        assert peak_rss(proc.pid) - before < 50 * 1024 * 1024
        assert max(probe.latencies) < 0.1, "the event loop stalled"
        assert client.get("/health/ready").status_code == 200


@pytest.mark.slow
def test_millions_of_empty_strings_are_refused_off_the_event_loop(text_repo):
    n = (9 * 1024 * 1024) // 4
    strings = b'{"instances": [[' + b",".join([b'""'] * n) + b"]]}"
    binary_header, headers = binary_request([1, n], 4 * n)
    with server_process("--models", str(text_repo), "--no-auth") as (proc, url):
        with httpx.Client(base_url=url, timeout=30) as client, HealthProbe(url) as probe:
            for _ in range(3):
                answer = client.post(
                    "/v1/models/textany:predict",
                    content=strings,
                    headers={"content-type": "application/json"},
                )
                assert answer.status_code == 400, answer.text
                assert "strings in one request; at most 65536" in answer.json()["error"]
                answer = client.post(
                    "/v2/models/textany/infer",
                    content=binary_header + bytes(4 * n),
                    headers=headers,
                )
                assert answer.status_code == 400
                assert "strings in one request; at most 65536" in answer.json()["error"]
        # a 10 MiB JSON body is parsed in a thread: /health waits for the GIL at worst
        # while orjson holds it, never for the whole request (seconds before)
        assert sorted(probe.latencies)[len(probe.latencies) // 2] < 0.02
        assert max(probe.latencies) < 0.5


@pytest.mark.parametrize(
    ("shape", "message"),
    [
        ([1] * 70, "shape has 70 dimensions; at most 8"),
        ([0, 2**63], "dimension 9223372036854775808 is too large"),
        ([2**40, 2**40], "is too large"),
        ([1, 4, -3], "non-negative integers"),
    ],
)
def test_impossible_shapes_are_400s(text_repo, make_settings, shape, message):
    with (
        ServerThread(make_settings(models=text_repo)) as server,
        httpx.Client(base_url=server.url) as client,
    ):
        tensor = {"name": "x", "shape": shape, "datatype": "FP32", "data": []}
        answer = client.post("/v2/models/doubler/infer", json={"inputs": [tensor]})
        assert answer.status_code == 400 and message in answer.json()["error"]
        tensor = {
            "name": "x",
            "shape": shape,
            "datatype": "FP32",
            "parameters": {"binary_data_size": 0},
        }
        header = json.dumps({"inputs": [tensor]}).encode()
        answer = client.post(
            "/v2/models/doubler/infer",
            content=header,
            headers={HEADER_LENGTH: str(len(header))},
        )
        assert answer.status_code == 400 and message in answer.json()["error"]
        deep = [[0.0]]
        for _ in range(68):
            deep = [deep]
        answer = client.post("/v1/models/doubler:predict", json={"instances": deep})
        assert answer.status_code == 400
        assert client.get("/health").status_code == 200


class Tripler(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * 3


@pytest.mark.slow
def test_the_pinned_digest_and_the_loaded_model_come_from_the_same_bytes(tmp_path: Path):
    """A file swapped while versions load (300 times) is either refused by its pin or not
    read at all: the pinned model is the only one ever loaded."""
    folder = write_model(tmp_path, "pinned", Doubler(), doubler_toml())
    good = (folder / "1" / "model.pt").read_bytes()
    stray = tmp_path / "stray.pt"
    torch.jit.script(Tripler()).save(str(stray))
    bad = stray.read_bytes()
    pin = hashlib.sha256(good).hexdigest()
    (folder / "model.toml").write_text(doubler_toml() + f'[sha256]\n"1" = "{pin}"\n')
    target = folder / "1" / "model.pt"
    staged = [tmp_path / "good.pt", tmp_path / "bad.pt"]
    staged[0].write_bytes(good)
    staged[1].write_bytes(bad)
    repository = ModelRepository(tmp_path, "cpu")
    config = repository.read_config("pinned")
    done = threading.Event()

    def swap() -> None:
        i = 0
        while not done.is_set():
            tmp = tmp_path / f"swap-{i % 2}.pt"
            tmp.write_bytes(staged[i % 2].read_bytes())
            os.replace(tmp, target)
            i += 1

    swapper = threading.Thread(target=swap, daemon=True)
    swapper.start()
    loaded = refused = 0
    try:
        for _ in range(300):
            try:
                model = repository.load_version("pinned", 1, config)
            except ModelLoadError as exc:
                assert "does not match the pinned" in exc.problem
                refused += 1
                continue
            loaded += 1
            out = model.forward([np.ones((1, 4), dtype=np.float32)])[0]
            assert model.sha256 == pin
            np.testing.assert_array_equal(out, np.full((1, 4), 2.0, dtype=np.float32))
    finally:
        done.set()
        swapper.join()
    assert loaded and refused  # the race really ran both ways


@pytest.fixture
def two_keys(tmp_path: Path) -> Path:
    path = tmp_path / "keys.toml"
    path.write_text(
        key_file_entry("alice", KEY_A, ["infer"]) + key_file_entry("bob", KEY_B, ["infer"])
    )
    return path


@pytest.mark.parametrize("scope", ["key", "shared"])
def test_the_cache_does_not_tell_one_key_what_another_asked(
    tmp_path, make_settings, two_keys, scope
):
    repo = tmp_path / "repo"
    toml = doubler_toml() + ("" if scope == "key" else '[cache]\nscope = "shared"\n')
    write_model(repo, "doubler", Doubler(), toml)
    settings = make_settings(models=repo, auth="on", api_keys_file=two_keys)
    body = {"instances": [[1.0, 2.0, 3.0, 4.5]]}
    with ServerThread(settings) as server, httpx.Client(base_url=server.url) as client:
        alice, bob = {"X-API-Key": KEY_A}, {"X-API-Key": KEY_B}
        path = "/v1/models/doubler:predict"
        first = client.post(path, json=body, headers=alice)
        again = client.post(path, json=body, headers=alice)
        from_bob = client.post(path, json=body, headers=bob)
        assert first.json()["predictions"] == from_bob.json()["predictions"]
        text = client.get("/metrics").text
        hits = [line for line in text.splitlines() if "torchgate_cache_requests_total{" in line]
        if scope == "key":
            # each key has its own entries: alice hits hers, bob misses
            assert first.headers["x-cache"] == "MISS" and again.headers["x-cache"] == "HIT"
            assert from_bob.headers["x-cache"] == "MISS"
            assert any('result="hit"} 1.0' in line for line in hits)
        else:
            # one shared entry, so no answer says whether it was a hit
            assert "x-cache" not in first.headers and "x-cache" not in from_bob.headers
            assert any('result="hit"} 2.0' in line for line in hits)


@pytest.mark.slow
def test_concurrent_loads_of_one_model_leave_no_runner_behind(tmp_path, make_settings):
    write_model(tmp_path, "doubler", Doubler(), doubler_toml(), versions=(1, 2))
    settings = make_settings(models=tmp_path, model_control="explicit", cache_ttl_s=0)

    def runners() -> int:
        return sum(t.name.startswith("runner-doubler/") for t in threading.enumerate())

    with ServerThread(settings) as server:
        load = server.url + "/v2/repository/models/doubler/load"
        assert httpx.post(load, timeout=60).status_code == 200
        after_one = runners()
        assert after_one == 2  # one runner per version

        async def six() -> list[int]:
            async with httpx.AsyncClient(timeout=120) as client:
                answers = await asyncio.gather(*(client.post(load) for _ in range(6)))
            return [a.status_code for a in answers]

        for _ in range(3):
            assert asyncio.run(six()) == [200] * 6
            assert runners() == after_one
        answer = httpx.post(
            server.url + "/v1/models/doubler:predict", json={"instances": [[1, 2, 3, 4]]}
        )
        assert answer.status_code == 200


def _raw_request(port: int, head: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        # refused mid-send: the answer was written before the close
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            sock.sendall(head)
        chunks = []
        while True:
            try:
                chunk = sock.recv(65536)
            except ConnectionResetError:
                break
            if not chunk:
                break
            chunks.append(chunk)
        return b"".join(chunks)


@pytest.mark.slow
def test_oversized_request_heads_are_refused(text_repo):
    with server_process("--models", str(text_repo), "--no-auth") as (proc, url):
        port = int(url.rsplit(":", 1)[1])
        before = peak_rss(proc.pid)
        big = b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * (1024 * 1024) + b"\r\n\r\n"
        answer = _raw_request(port, big)
        assert answer.startswith(b"HTTP/1.1 431 "), answer[:200]
        assert b"request headers too large" in answer
        many = b"GET /health HTTP/1.1\r\nHost: x\r\n" + b"".join(
            b"X-H%d: 1\r\n" % i for i in range(200)
        )
        answer = _raw_request(port, many + b"\r\n")
        assert answer.startswith(b"HTTP/1.1 431 ")
        long_url = b"GET /" + b"a" * (128 * 1024) + b" HTTP/1.1\r\nHost: x\r\n\r\n"
        assert _raw_request(port, long_url).startswith(b"HTTP/1.1 431 ")
        assert peak_rss(proc.pid) - before < 20 * 1024 * 1024
        # ordinary requests, a large body among them, are untouched
        with httpx.Client(base_url=url) as client:
            headers = {f"x-h{i}": "v" * 100 for i in range(50)}
            assert client.get("/health", headers=headers).status_code == 200
            big_body = {"instances": [["x" * 30]] * 8}
            answer = client.post("/v1/models/textlen:predict", json=big_body)
            assert answer.status_code == 200

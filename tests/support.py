"""Test support: real servers (in a thread or as a `torchgate serve` process), waiting on
a condition rather than for a while (`until`, `eventually`, `until_started`), and tiny
TorchScript models written into temporary model repositories."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
import torch
import uvicorn
from torch import nn

from torchgate.app import create_app
from torchgate.config import Settings

ROOT = Path(__file__).resolve().parents[1]
# observed once for each request as its batch starts: how many have reached a forward
QUEUE_WAITS = "torchgate_queue_wait_seconds_count"
MODELS = ROOT / "models"


class ServerThread:
    """The real app behind a real uvicorn server on a free 127.0.0.1 port, in a thread."""

    def __init__(self, settings: Settings) -> None:
        self.app = create_app(settings)
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind(("127.0.0.1", 0))
        self.port = self._sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(self.app, log_config=None, access_log=False, lifespan="on")
        self.server = uvicorn.Server(config)
        self._thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [self._sock]}, daemon=True
        )

    def __enter__(self) -> ServerThread:
        self._thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("test server did not start")
            time.sleep(0.02)  # pacing: a poll
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self._thread.join(timeout=60)
        self._sock.close()


async def until(condition: Callable[[], bool], timeout_s: float = 10.0) -> None:
    """Yield to the event loop until `condition()` holds; fail after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"still not true after {timeout_s} s: {condition}")
        await asyncio.sleep(0.001)  # pacing: a poll, the condition decides


def eventually(condition: Callable[[], bool], timeout_s: float = 10.0) -> None:
    """Poll `condition()` from a test's thread until it holds; fail after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"still not true after {timeout_s} s: {condition}")
        time.sleep(0.01)  # pacing: a poll, the condition decides


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def server_process(
    *args: str, env: dict[str, str] | None = None, ready_path: str = "/health"
) -> Iterator[tuple[subprocess.Popen[str], str]]:
    """`torchgate serve` as a child process on a free port; stopped by its PID."""
    port = free_port()
    full_env = {**os.environ, "TORCHGATE_RATE_LIMIT": "off", **(env or {})}
    url = f"http://127.0.0.1:{port}"
    # the log goes to a file: a pipe nobody reads would fill and block the server's logging
    with tempfile.TemporaryFile(mode="w+") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "torchgate", "serve", "--port", str(port), *args],
            env=full_env,
            stdout=log,
            stderr=subprocess.STDOUT,
            text=True,
        )
        try:
            deadline = time.monotonic() + 90
            while True:
                if proc.poll() is not None:
                    log.seek(0)
                    raise RuntimeError(f"server exited {proc.returncode}: {log.read()[-4000:]}")
                try:
                    if httpx.get(url + ready_path, timeout=1).status_code < 500:
                        break
                except httpx.TransportError:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError("server did not come up")
                time.sleep(0.1)  # pacing: a poll
            yield proc, url
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()


def promtool() -> str:
    """The promtool binary; the test is skipped where it is not installed (`.ci/run`
    installs Debian's `prometheus`, which carries it)."""
    found = shutil.which("promtool")
    if found is None:
        pytest.skip("promtool is not installed (apt-get install -y prometheus)")
    return found


def redis_up(port: int = 6379) -> bool:
    """Whether a Redis answers PING on 127.0.0.1:`port`."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(16).startswith(b"+PONG")
    except OSError:
        return False


def metric(text: str, name: str, **labels: str) -> float:
    """One sample's value from Prometheus text (0 when the series is absent)."""
    wanted = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        match = re.match(rf"^{re.escape(name)}(?:\{{(.*)\}})? (\S+)$", line)
        if match and ",".join(sorted((match.group(1) or "").split(","))) == wanted:
            return float(match.group(2))
    return 0.0


async def started(client: httpx.AsyncClient, model: str, version: str = "1") -> float:
    """How many requests of a model version have reached a forward (a request's queue wait
    is observed as its batch starts), from the server's /metrics."""
    text = (await client.get("/metrics")).text
    return metric(text, QUEUE_WAITS, model=model, version=version)


async def until_metric(
    client: httpx.AsyncClient,
    name: str,
    done: Callable[[float], bool],
    timeout_s: float = 10.0,
    **labels: str,
) -> None:
    """Scrape the server's /metrics until `done(value)` holds for one sample (absent: 0);
    fail after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while not done(metric((await client.get("/metrics")).text, name, **labels)):
        assert time.monotonic() < deadline, f"{name} {labels} not there after {timeout_s} s"
        await asyncio.sleep(0.01)  # pacing: a poll, the metric decides


async def until_started(
    client: httpx.AsyncClient, model: str, count: float, version: str = "1"
) -> None:
    """Wait until `count` requests of a model version have reached a forward: one sent
    before is then computing, not queued or still on its way."""
    await until_metric(
        client, QUEUE_WAITS, lambda n: n >= count, timeout_s=30, model=model, version=version
    )


def run_cli(*args: str, env: dict[str, str] | None = None, timeout: float = 120):
    return subprocess.run(
        [sys.executable, "-m", "torchgate", *args],
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


# tiny TorchScript models -------------------------------------------------------------------


class Doubler(nn.Module):
    """Returns 2 * x for rows of 4. A row holding 666 raises. A row [777, n, ...] spins for
    n * 500 small matmuls (about n * 50 ms on one core) before answering."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if bool((x == 666.0).any()):
            raise RuntimeError("poisoned input")
        slow = x[:, 0] == 777.0
        if bool(slow.any()):
            rounds = int(x[:, 1][slow].max().item()) * 500
            y = torch.ones(128, 128) / 128.0
            for _ in range(rounds):
                y = torch.tanh(y @ y)
            return x * 2 + y.sum() * 0
        return x * 2


BREAK, MEND = 555.0, 444.0


class Breakable(nn.Module):
    """A Doubler that a row holding 555 breaks, as a model whose state went bad: from then
    on every forward raises, known-good input included, until a row holding 444 mends it."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("broken", torch.zeros(1))
        self.doubler = Doubler()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if bool((x == 444.0).any()):  # MEND
            self.broken.zero_()
        elif bool((x == 555.0).any()):  # BREAK
            self.broken.fill_(1.0)
        if bool(self.broken[0] > 0):
            raise RuntimeError("the model is broken")
        return self.doubler(x)


def slow_row(tenths: int) -> list[float]:
    """A Doubler row that holds a runner for roughly `tenths` * 50 ms."""
    return [777.0, float(tenths), 0.0, 0.0]


class TwoInputs(nn.Module):
    def forward(self, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return a + b.to(a.dtype), (a * b.to(a.dtype)).sum(1)


def doubler_toml(max_batch_size: int = 64, **batching: object) -> str:
    lines = [
        f"max_batch_size = {max_batch_size}",
        '[[inputs]]\nname = "x"\ndatatype = "FP32"\nshape = [4]',
        '[[outputs]]\nname = "y"\ndatatype = "FP32"\nshape = [4]',
    ]
    if batching:
        lines.append("[batching]")
        lines += [f"{k} = {v}" for k, v in batching.items()]
    return "\n".join(lines) + "\n"


def write_model(
    repo: Path, name: str, module: nn.Module, toml: str, versions: tuple[int, ...] = (1,)
) -> Path:
    folder = repo / name
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "model.toml").write_text(toml)
    scripted = torch.jit.script(module)
    for version in versions:
        (folder / str(version)).mkdir(exist_ok=True)
        scripted.save(str(folder / str(version) / "model.pt"))
    return folder


def copy_digits(repo: Path) -> Path:
    target = repo / "digits"
    shutil.copytree(MODELS / "digits", target)
    return target


@contextmanager
def own_redis() -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    """A redis-server of the test's own on a free port (so it can be stopped mid-test)."""
    port = free_port()
    redis = subprocess.Popen(
        [
            "redis-server",
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 10
        while not redis_up(port):
            assert redis.poll() is None and time.monotonic() < deadline, (
                "redis-server did not start"
            )
            time.sleep(0.05)  # pacing: a poll
        yield redis, f"redis://127.0.0.1:{port}/0"
    finally:
        if redis.poll() is None:
            redis.terminate()
            redis.wait(timeout=10)

"""The servers under test, as processes of `bench/run.py` (owns starting and stopping them).

Each server runs alone: started with `subprocess`, bound to 127.0.0.1 on a free port, its
output going to a log file; ready once it answers a real request with 200; stopped by its
PID (SIGTERM, then SIGKILL if it has not exited within the grace period).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import TracebackType

BIN = Path(sys.executable).parent
BENCH = Path(__file__).resolve().parent
READY_TIMEOUT_S = 90.0
STOP_GRACE_S = 15.0


class ServerError(RuntimeError):
    """A server did not start, or died, or never answered."""


# torchgate is measured as it runs in production: with auth and the rate limiter on (a
# per-run key whose limit no single benchmark client reaches). The naive server ignores it.
BENCH_KEY = "bench_" + secrets.token_urlsafe(24)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def post(
    url: str, body: bytes, headers: dict[str, str], timeout: float = 30.0
) -> tuple[int, dict[str, str], bytes]:
    """One POST with the benchmark's key: status, headers (lower-case names) and body."""
    headers = {**headers, "Authorization": f"Bearer {BENCH_KEY}"}
    request = urllib.request.Request(url, data=body, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, _lower(response.headers.items()), response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, _lower(exc.headers.items()), exc.read()


def _lower(items: list[tuple[str, str]]) -> dict[str, str]:
    return {k.lower(): v for k, v in items}


def single_model_repository(folder: Path, parent: Path) -> Path:
    """A repository holding only `folder`'s model (torchgate serves every model it finds,
    and refuses links out of its root, so the folder is copied, by hard links where it can)."""
    root = parent / f"repo-{folder.name}"
    if not root.exists():
        try:
            shutil.copytree(folder, root / folder.name, copy_function=os.link)
        except OSError:
            shutil.rmtree(root, ignore_errors=True)
            shutil.copytree(folder, root / folder.name)
    return root


def torchgate_command(repository: Path, port: int, threads: int, log_level: str) -> list[str]:
    return [
        str(BIN / "torchgate"),
        "serve",
        "--models",
        str(repository),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--torch-threads",
        str(threads),
        "--log-level",
        log_level,
        "--drain-timeout-s",
        "5",
    ]


def naive_command(model_pt: Path, port: int, threads: int) -> list[str]:
    return [
        sys.executable,
        str(BENCH / "naive_server.py"),
        "--model",
        str(model_pt),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--torch-threads",
        str(threads),
    ]


class Server:
    """A server process for a `with` block: started and ready inside, stopped after."""

    def __init__(
        self,
        command: list[str],
        *,
        env: dict[str, str],
        log_path: Path,
        probe_url: str,
        probe_body: bytes,
        probe_type: str = "application/json",
    ) -> None:
        self.command = command
        self.env = env
        self.log_path = log_path
        self.probe_url = probe_url
        self.probe_body = probe_body
        self.probe_type = probe_type
        self.first_answer = b""
        self._process: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> Server:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("wb") as log:
            # a session of its own: stopping it stops what it started too (TorchServe's Java)
            self._process = subprocess.Popen(
                self.command,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.env,
                cwd=self.log_path.parent,
                start_new_session=True,
            )
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def _wait_ready(self) -> None:
        assert self._process is not None
        deadline = time.monotonic() + READY_TIMEOUT_S
        last = "no answer"
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise ServerError(
                    f"exited with {self._process.returncode} before it was ready; "
                    f"see {self.log_path}"
                )
            try:
                status, _, body = post(
                    self.probe_url, self.probe_body, {"Content-Type": self.probe_type}, 5.0
                )
            except OSError as exc:
                last = str(exc)
            else:
                if status == 200:
                    self.first_answer = body
                    return
                last = f"{status} {body[:200]!r}"
            time.sleep(0.2)
        raise ServerError(f"not ready after {READY_TIMEOUT_S:.0f} s (last: {last})")

    @property
    def pid(self) -> int:
        assert self._process is not None
        return self._process.pid

    def stop(self) -> None:
        process, self._process = self._process, None
        if process is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)  # what it started and left behind

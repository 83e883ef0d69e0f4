"""Triton's perf_analyzer against torchgate over HTTP (`make perf-analyzer`).

perf_analyzer is the load tool Triton's users measure every server with. The package
index's `perf-analyzer` is only a placeholder; the binary ships inside the
`tritonclient==2.40.0` manylinux wheel (`bin/perf_analyzer`) and runs over HTTP without a
GPU once Debian's `libb64-0d` is installed and `libcudart.so.12` (from the
`nvidia-cuda-runtime-cu12` wheel) is on `LD_LIBRARY_PATH`. The first run installs both
wheels into a small virtual environment of their own, `build/perf-analyzer/` (the
project's own .venv keeps its newer tritonclient), and `libb64-0d` with apt-get where it
is missing (as root; elsewhere it says how).

Then it starts `torchgate serve` on the model (a fresh key, no rate limit, the cache off
so that every request is computed: perf_analyzer sends the same input each time), runs
perf_analyzer at each concurrency and prints its report and a summary table.

    python scripts/perf_analyzer.py [--model digits] [--concurrency 1:8:1] [--window-ms 2000]
"""

from __future__ import annotations

import argparse
import csv
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
INSTALL_DIR = ROOT / "build" / "perf-analyzer"
WHEELS = ("tritonclient==2.40.0", "nvidia-cuda-runtime-cu12==12.9.79")
LIBB64 = "libb64.so.0d"


class Unavailable(Exception):
    """perf_analyzer cannot be installed here; the message says why and what to do."""


@dataclass(frozen=True, slots=True)
class PerfAnalyzer:
    """The installed binary and the environment it runs in."""

    binary: Path
    env: dict[str, str]

    def run(self, *args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(self.binary), *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )


def install(where: Path = INSTALL_DIR) -> PerfAnalyzer:
    """perf_analyzer from the wheels, installed under `where` once; `Unavailable` when the
    wheels or libb64 cannot be had."""
    venv = where / "venv"
    binary = venv / "bin" / "perf_analyzer"
    if not binary.exists():
        if venv.exists():
            shutil.rmtree(venv)
        _step([sys.executable, "-m", "venv", "--without-pip", str(venv)], "create a venv")
        _step(
            [sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python")]
            + ["install", "-q", "--no-deps", "--only-binary", ":all:", *WHEELS],
            f"install {' and '.join(WHEELS)} from the package index",
        )
        if not binary.exists():
            raise Unavailable(f"{WHEELS[0]} installed no bin/perf_analyzer")
    cudart = sorted(venv.glob("lib/python*/site-packages/nvidia/cuda_runtime/lib"))
    if not cudart:
        raise Unavailable("nvidia-cuda-runtime-cu12 installed no libcudart.so.12")
    _libb64()
    paths = [str(cudart[0]), *filter(None, [os.environ.get("LD_LIBRARY_PATH")])]
    tool = PerfAnalyzer(binary, {**os.environ, "LD_LIBRARY_PATH": os.pathsep.join(paths)})
    missing = _missing_libraries(tool)
    if missing:
        raise Unavailable(f"perf_analyzer still lacks {', '.join(missing)}")
    return tool


def _step(command: list[str], what: str) -> None:
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=600, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise Unavailable(f"could not {what}: {exc}") from None
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
        raise Unavailable(f"could not {what}: {tail[0]}")


def _libb64() -> None:
    if _have_library(LIBB64):
        return
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        raise Unavailable(f"{LIBB64} is missing: apt-get install -y libb64-0d (as root)")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "-qq", "libb64-0d"]
    if subprocess.run(install, env=env, capture_output=True, check=False).returncode != 0:
        _step(["apt-get", "update", "-qq"], "update apt's package lists")
        _step(install, "apt-get install libb64-0d")
    if not _have_library(LIBB64):
        raise Unavailable(f"apt-get installed libb64-0d but {LIBB64} is not found")


def _have_library(name: str) -> bool:
    found = subprocess.run(["ldconfig", "-p"], capture_output=True, text=True, check=False)
    return name in found.stdout


def _missing_libraries(tool: PerfAnalyzer) -> list[str]:
    linked = subprocess.run(
        ["ldd", str(tool.binary)], env=tool.env, capture_output=True, text=True, check=False
    )
    return [line.split()[0] for line in linked.stdout.splitlines() if "not found" in line]


# measuring ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Level:
    """perf_analyzer's result at one concurrency (latencies in microseconds)."""

    concurrency: int
    throughput: float
    p50_us: int
    p99_us: int
    queue_us: int
    compute_us: int


def measure(
    tool: PerfAnalyzer,
    url: str,
    *,
    model: str = "digits",
    key: str | None = None,
    concurrency: str = "1:8:1",
    window_ms: int = 1000,
    max_trials: int = 20,
    extra: tuple[str, ...] = (),
) -> tuple[subprocess.CompletedProcess[str], list[Level]]:
    """Run perf_analyzer against `url` (host:port) over HTTP; its output and its levels.

    A level whose windows never agree within the stability bound ends the run early (with
    a message on stderr and, in 2.40, exit status 0): compare the levels to those asked."""
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.csv"
        args = ["-m", model, "-u", url, "-i", "http", "--concurrency-range", concurrency]
        args += ["--measurement-interval", str(window_ms), "--max-trials", str(max_trials)]
        args += ["-f", str(report), *extra]
        if key is not None:
            args += ["-H", f"Authorization: Bearer {key}"]
        done = tool.run(*args)
        levels = _levels(report) if report.exists() else []
    return done, levels


def _levels(report: Path) -> list[Level]:
    """The report's rows by concurrency (perf_analyzer orders them by throughput)."""
    with report.open(newline="") as rows:
        levels = [
            Level(
                concurrency=int(row["Concurrency"]),
                throughput=float(row["Inferences/Second"]),
                p50_us=int(row["p50 latency"]),
                p99_us=int(row["p99 latency"]),
                queue_us=int(row["Server Queue"]),
                compute_us=int(row["Server Compute Infer"]),
            )
            for row in csv.DictReader(rows)
        ]
    return sorted(levels, key=lambda level: level.concurrency)


def _bounds(concurrency: str) -> tuple[int, int, int]:
    """`start:end:step` as `range` arguments (end included, as perf_analyzer reads it)."""
    start, end, step = (int(part) for part in (concurrency.split(":") + ["1", "1"])[:3])
    return start, end + 1, step


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", type=Path, default=ROOT / "models")
    parser.add_argument("--model", default="digits")
    parser.add_argument("--concurrency", default="1:8:1", help="start:end:step")
    parser.add_argument("--window-ms", type=int, default=1000, help="measurement window")
    parser.add_argument(
        "--stability", type=int, default=30, help="percent a level's windows may differ by"
    )
    parser.add_argument("--max-trials", type=int, default=20, help="windows per level at most")
    args = parser.parse_args()
    try:
        tool = install()
    except Unavailable as exc:
        print(f"perf_analyzer: {exc}", file=sys.stderr)
        return 2
    key, port = "tg_perf_" + secrets.token_urlsafe(24), _free_port()
    env = {
        **os.environ,
        "TORCHGATE_API_KEYS": key,
        "TORCHGATE_RATE_LIMIT": "off",
        "TORCHGATE_CACHE_TTL_S": "0",
        "TORCHGATE_LOG_LEVEL": "warning",
    }
    command = [sys.executable, "-m", "torchgate", "serve", "--models", str(args.models)]
    command += ["--port", str(port), "--default-model", args.model]
    server = subprocess.Popen(command, env=env)
    try:
        url = f"127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while True:
            if server.poll() is not None:
                print(f"torchgate exited {server.returncode}", file=sys.stderr)
                return 1
            try:
                if httpx.get(f"http://{url}/health/ready", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                print("torchgate did not become ready", file=sys.stderr)
                return 1
            time.sleep(0.2)
        done, levels = measure(
            tool,
            url,
            model=args.model,
            key=key,
            concurrency=args.concurrency,
            window_ms=args.window_ms,
            extra=("--stability-percentage", str(args.stability)),
            max_trials=args.max_trials,
        )
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=60)
    print(done.stdout)
    print(done.stderr, file=sys.stderr, end="")
    wanted = len(range(*_bounds(args.concurrency)))
    if done.returncode != 0 or len(levels) != wanted:
        print(f"perf_analyzer measured {len(levels)} of {wanted} levels", file=sys.stderr)
        return 1
    print(f"perf_analyzer on {args.model} over HTTP (torchgate, cache off):")
    print("concurrency  infer/s   p50 us   p99 us  queue us  compute us")
    for level in levels:
        print(
            f"{level.concurrency:>11}  {level.throughput:>7.0f}  {level.p50_us:>7}  "
            f"{level.p99_us:>7}  {level.queue_us:>8}  {level.compute_us:>10}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Many models in bounded memory: torchgate serving 40 generated models of 3 MiB each under
Zipf-distributed traffic at 16 connections, with a memory budget that holds 8 of them
against no budget at all (every model stays loaded once it was).

    python bench/residency.py [--duration 15] [--models 40] [--holds 8] [--connections 16]

For each cell a fresh `torchgate serve` (no auth, no rate limit, cache off: every request
is computed) on a repository of `load = "on_demand"` models, each answering x + its
number; wrk sends one-row requests whose model follows a Zipf sample (s = 1.1, ranks
shuffled) through `bench/zipf.lua`. Reported: requests/s, p50 and p99 from wrk, the share
of requests that waited for their model to load (`torchgate_model_load_waits_total` over
the requests answered), loads and evictions, and the most the models held against the
budget. Every model is then asked once and must answer right. Results go to
`bench/results/residency.json`. `make bench-residency` runs it.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

BENCH = Path(__file__).resolve().parent
RESULTS = BENCH / "results"
LUA = BENCH / "zipf.lua"
TORCHGATE = Path(sys.executable).parent / "torchgate"
FLOATS = 768 * 1024  # 3 MiB of float32 per model
ROW = [1.0, 2.0, 3.0, 4.0]
BODY = json.dumps({"instances": [ROW]})
TOML = """load = "on_demand"
max_batch_size = 8
[[inputs]]
name = "x"
datatype = "FP32"
shape = [4]
[[outputs]]
name = "y"
datatype = "FP32"
shape = [4]
"""


class Offset(nn.Module):
    """x + the model's number, with `floats` floats of ballast: its size."""

    def __init__(self, number: float, floats: int) -> None:
        super().__init__()
        self.register_buffer("ballast", torch.full((floats,), number))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.ballast[0]


def make_repository(root: Path, models: int) -> int:
    """`models` models m00, m01, ... under `root`; returns one model file's size."""
    for number in range(models):
        folder = root / f"m{number:02d}"
        (folder / "1").mkdir(parents=True)
        (folder / "model.toml").write_text(TOML)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch.jit.script is deprecated: the format served
            torch.jit.script(Offset(float(number), FLOATS)).save(str(folder / "1" / "model.pt"))
    return (root / "m00" / "1" / "model.pt").stat().st_size


def zipf_sample(count: int, models: int, seed: int = 16, s: float = 1.1) -> list[int]:
    rng = np.random.default_rng(seed)
    weights = 1.0 / np.arange(1, models + 1) ** s
    ranks = rng.choice(models, size=count, p=weights / weights.sum())
    order = rng.permutation(models)
    return [int(order[r]) for r in ranks]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def post(url: str, body: str) -> tuple[int, bytes]:
    request = urllib.request.Request(
        url, data=body.encode(), headers={"Content-Type": "application/json"}, method="POST"
    )
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def metrics(url: str) -> str:
    with urllib.request.urlopen(url + "/metrics", timeout=30) as response:
        return response.read().decode()


def total(text: str, name: str, **labels: str) -> float:
    """The sum of a metric's samples whose labels include `labels`."""
    found = 0.0
    for match in re.finditer(rf"^{name}(?:\{{([^}}]*)\}})? (\S+)$", text, re.MULTILINE):
        have = dict(re.findall(r'(\w+)="([^"]*)"', match.group(1) or ""))
        if all(have.get(k) == v for k, v in labels.items()):
            found += float(match.group(2))
    return found


class Serve:
    """`torchgate serve` on a repository, in a `with` block; stopped by its PID."""

    def __init__(self, repo: Path, log: Path, env: dict[str, str], threads: int) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.command = [
            str(TORCHGATE), "serve", "--models", str(repo), "--host", "127.0.0.1",
            "--port", str(self.port), "--no-auth", "--device", "cpu",
            "--torch-threads", str(threads), "--log-level", "warning",
        ]  # fmt: skip
        self.env = {
            **os.environ,
            "TORCHGATE_RATE_LIMIT": "off",
            "TORCHGATE_CACHE_TTL_S": "0",
            **env,
        }
        self.log = log
        self.process: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> Serve:
        with self.log.open("wb") as out:
            self.process = subprocess.Popen(
                self.command, stdout=out, stderr=subprocess.STDOUT, env=self.env
            )
        deadline = time.monotonic() + 90
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"torchgate exited: {self.log.read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(self.url + "/health/ready", timeout=1) as r:
                    if r.status == 200:
                        return self
            except (urllib.error.URLError, ConnectionError):
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("torchgate did not get ready")
            time.sleep(0.1)

    def __exit__(self, *exc: object) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def wrk(url: str, paths: Path, connections: int, duration: int) -> dict[str, float]:
    result = subprocess.run(
        ["wrk", "-t2", f"-c{connections}", f"-d{duration}s", "--timeout", "30s",
         "-s", str(LUA), url, "--", f"paths={paths}", f"body={BODY}"],
        capture_output=True, text=True, timeout=duration + 120,
    )  # fmt: skip
    line = next((x for x in result.stdout.splitlines() if x.startswith("BENCH_JSON ")), None)
    if line is None:
        raise RuntimeError(f"wrk printed no numbers: {result.stdout}{result.stderr}")
    return json.loads(line.removeprefix("BENCH_JSON "))


def cell(
    name: str, repo: Path, paths: Path, args: argparse.Namespace, budget: int | None
) -> dict[str, object]:
    env = {} if budget is None else {"TORCHGATE_MODEL_MEMORY_BYTES": str(budget)}
    threads = max(1, (os.cpu_count() or 2) // 2)
    log = RESULTS / f"residency-{name}.log"
    with Serve(repo, log, env, threads) as server:
        # torch's first forward and first load paid before measuring; without a budget,
        # every model loaded (the steady state of a server that keeps them all)
        warm = range(args.models) if budget is None else range(args.holds)
        for number in warm:
            post(f"{server.url}/v1/models/m{number:02d}:predict", BODY)
        before = metrics(server.url)
        run = wrk(server.url, paths, args.connections, args.duration)
        after = metrics(server.url)
        wrong = []
        for number in range(args.models):
            status, answer = post(f"{server.url}/v1/models/m{number:02d}:predict", BODY)
            want = [[v + number for v in ROW]]
            if status != 200 or json.loads(answer)["predictions"] != want:
                wrong.append(f"m{number:02d}: {status} {answer[:200]!r}")

    def grown(metric: str, **labels: str) -> float:
        return total(after, metric, **labels) - total(before, metric, **labels)

    answered = grown("ai_requests_total")
    seconds = run["duration_us"] / 1e6
    return {
        "cell": name,
        "models": args.models,
        "budget_bytes": budget,
        "connections": args.connections,
        "requests": run["requests"],
        "rps": round(run["requests"] / seconds, 1),
        "p50_ms": run["p50_us"] / 1000,
        "p99_ms": run["p99_us"] / 1000,
        "max_ms": run["max_us"] / 1000,
        "non200": run["non200"],
        "socket_errors": run["socket_errors"],
        "waited_share": round(grown("torchgate_model_load_waits_total") / answered, 4)
        if answered
        else None,
        "loads": grown("torchgate_model_loads_total", result="ok"),
        "failed_loads": grown("torchgate_model_loads_total", result="failed")
        + grown("torchgate_model_loads_total", result="no_room"),
        "evictions": grown("torchgate_model_evictions_total"),
        "peak_held_bytes": total(after, "torchgate_model_memory_peak_bytes"),
        "wrong_answers": wrong,
    }


def measure(
    duration: int, models: int = 40, holds: int = 8, connections: int = 16
) -> list[dict[str, object]]:
    """The two cells, a budget holding `holds` models against none; for `make bench`."""
    args = argparse.Namespace(
        duration=duration, models=models, holds=holds, connections=connections
    )
    RESULTS.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="torchgate-residency-") as tmp:
        repo = Path(tmp) / "models"
        size = make_repository(repo, models)
        paths = Path(tmp) / "paths.txt"
        sample = zipf_sample(50_000, models)
        paths.write_text("".join(f"/v1/models/m{n:02d}:predict\n" for n in sample))
        budget = holds * size + size // 2
        return [
            {**cell(f"budget-{holds}", repo, paths, args, budget), "model_bytes": size},
            {**cell("no-budget", repo, paths, args, None), "model_bytes": size},
        ]


def table(cells: list[dict[str, object]]) -> str:
    first = cells[0]
    lines = [
        f"{first['models']} models of {first['model_bytes'] / 2**20:.1f} MiB, Zipf s=1.1, "
        f"c={first['connections']}",
        "| cell | rps | p50 ms | p99 ms | waited for a load | loads | evictions | peak held MiB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for c in cells:
        budget_mib = "" if c["budget_bytes"] is None else f" of {c['budget_bytes'] / 2**20:.1f}"
        lines.append(
            f"| {c['cell']} | {c['rps']:,.0f} | {c['p50_ms']:.2f} | {c['p99_ms']:.1f} "
            f"| {c['waited_share']:.1%} | {c['loads']:.0f} | {c['evictions']:.0f} "
            f"| {c['peak_held_bytes'] / 2**20:.1f}{budget_mib} |"
        )
    return "\n".join(lines)


def problems(cells: list[dict[str, object]]) -> list[str]:
    """A line for each cell with an answer not 200, a socket error or a wrong answer."""
    return [
        f"{c['cell']}: {c['non200']} answers not 200, {c['socket_errors']} socket errors, "
        f"wrong: {c['wrong_answers'][:3]}"
        for c in cells
        if c["non200"] or c["socket_errors"] or c["wrong_answers"]
    ]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=int, default=15, help="seconds of load per cell")
    parser.add_argument("--models", type=int, default=40)
    parser.add_argument("--holds", type=int, default=8, help="models the budget holds")
    parser.add_argument("--connections", type=int, default=16)
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        print("wrk is not installed (apt-get install -y wrk)", file=sys.stderr)
        return 2
    cells = measure(args.duration, args.models, args.holds, args.connections)
    (RESULTS / "residency.json").write_text(json.dumps(cells, indent=2) + "\n")
    print(table(cells))
    bad = problems(cells)
    for line in bad:
        print(line, file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())

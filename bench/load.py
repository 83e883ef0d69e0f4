"""The load of `bench/run.py` (owns what is sent and how it is measured): request bodies
for wrk, wrk runs and their numbers, and the in-process limit of a model's forward.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from servers import BENCH_KEY

BENCH = Path(__file__).resolve().parent
LUA = BENCH / "post.lua"
SENTINEL = "@BENCH@"
MLP_ROWS = 256
V2_ROWS = 64
IN_PROCESS_BATCHES = (1, 8, 16, 32, 64)


class HarnessError(RuntimeError):
    """The benchmark itself could not do its job (wrk missing or broken, bad output)."""


@dataclass(slots=True)
class Cell:
    """One measured (or skipped) load: a server, a model, a scenario, a concurrency (and,
    for a cell measured in rounds, the round)."""

    server: str
    model: str
    scenario: str
    concurrency: int
    rows_per_request: int = 1
    status: str = "ok"
    rps: float | None = None
    p50_ms: float | None = None
    p90_ms: float | None = None
    p99_ms: float | None = None
    max_ms: float | None = None
    requests: int = 0
    non2xx: int = 0
    socket_errors: int = 0
    duration_s: float = 0.0
    round: int | None = None  # which round of a cell measured several times (main, cache)
    batch_size: float | None = None  # torchgate: the mean rows per forward it formed

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(slots=True)
class Workload:
    """What one model is sent: its rows, wrk's template file and one exact request."""

    model: str
    rows: np.ndarray
    templates: Path
    sample_body: bytes
    reference: np.ndarray


def ensure_wrk() -> str:
    """wrk's path, installing it with apt-get when it is missing."""
    found = shutil.which("wrk")
    if found:
        return found
    commands = [["apt-get", "update"], ["apt-get", "install", "-y", "wrk"]]
    if shutil.which("sudo") and not _is_root():
        commands = [["sudo", *c] for c in commands]
    for command in commands:
        print(f"wrk is missing: running {' '.join(command)}", flush=True)
        if subprocess.run(command, check=False).returncode != 0:
            raise HarnessError(f"{' '.join(command)} failed; install wrk and run again")
    found = shutil.which("wrk")
    if not found:
        raise HarnessError("apt-get installed wrk but it is not on PATH")
    return found


def _is_root() -> bool:
    return os.geteuid() == 0


def wrk_version(wrk: str) -> str:
    out = subprocess.run([wrk, "-v"], capture_output=True, text=True, check=False).stdout
    return out.splitlines()[0].strip() if out else "unknown"


def template_line(row: np.ndarray) -> str:
    """One request for `row` as "prefix<TAB>first number<TAB>suffix" (see post.lua)."""
    nested = row.tolist()
    first = nested
    while isinstance(first[0], list):
        first = first[0]
    value = first[0]
    first[0] = SENTINEL
    prefix, suffix = json.dumps({"instances": [nested]}).split(json.dumps(SENTINEL))
    return f"{prefix}\t{value!r}\t{suffix}"


def workload(model: str, folder: Path, module: torch.jit.ScriptModule, out: Path) -> Workload:
    """Real validation rows for digits, seeded random normal rows for anything else."""
    validation = folder / "validation.npz"
    if validation.exists():
        rows = np.load(validation)["x"].astype(np.float32)
    else:
        rows = np.random.default_rng(0).standard_normal((MLP_ROWS, 512), dtype=np.float32)
    templates = out / f"{model}-bodies.txt"
    templates.write_text("\n".join(template_line(r) for r in rows) + "\n", encoding="utf-8")
    with torch.inference_mode():
        reference = module(torch.from_numpy(rows[:1])).numpy()
    sample = json.dumps({"instances": rows[:1].tolist()}).encode()
    return Workload(model, rows, templates, sample, reference)


def v2_bodies(rows: np.ndarray, out: Path) -> tuple[Path, Path, int]:
    """V2 JSON and binary bodies of `V2_ROWS` rows, and the binary body's header length."""
    batch = np.ascontiguousarray(rows[:V2_ROWS], dtype="<f4")
    tensor = {"name": "input", "shape": list(batch.shape), "datatype": "FP32"}
    as_json = {"inputs": [{**tensor, "data": batch.reshape(-1).tolist()}]}
    header = json.dumps(
        {
            "inputs": [{**tensor, "parameters": {"binary_data_size": batch.nbytes}}],
            "outputs": [{"name": "logits", "parameters": {"binary_data": True}}],
        }
    ).encode()
    json_path, binary_path = out / "v2-body.json", out / "v2-body.bin"
    json_path.write_text(json.dumps(as_json), encoding="utf-8")
    binary_path.write_bytes(header + batch.tobytes())
    return json_path, binary_path, len(header)


def load_module(path: Path) -> torch.jit.ScriptModule:
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", message=r"`torch\.jit\.load` is deprecated", category=DeprecationWarning
        )
        module = torch.jit.load(str(path), map_location="cpu")
    return module.eval()


def in_process_limit(
    module: torch.jit.ScriptModule, rows: np.ndarray, threads: int, seconds: float
) -> dict[int, float]:
    """Rows/s of the bare forward in a tight loop, per batch size, on `threads` threads."""
    torch.set_num_threads(threads)
    rates: dict[int, float] = {}
    with torch.inference_mode():
        for batch in IN_PROCESS_BATCHES:
            x = torch.from_numpy(rows[np.arange(batch) % len(rows)])
            for _ in range(3):
                module(x)
            calls, started = 0, time.perf_counter()
            while (elapsed := time.perf_counter() - started) < seconds:
                module(x)
                calls += 1
            rates[batch] = calls * batch / elapsed
    return rates


def run_wrk(
    wrk: str,
    url: str,
    concurrency: int,
    seconds: int,
    lua_args: list[str],
    log: Path,
) -> dict[str, Any]:
    """One wrk run; the numbers post.lua's done() printed. Every run gets its own seed, so
    no run repeats the inputs of an earlier one (which the cache would answer)."""
    threads = 1 if concurrency == 1 else 2
    seed = random.SystemRandom().randrange(1, 2**31)
    command = [
        wrk,
        f"-t{threads}",
        f"-c{concurrency}",
        f"-d{seconds}s",
        "--timeout",
        "15s",
        "-s",
        str(LUA),
        url,
        "--",
        *lua_args,
        f"key={BENCH_KEY}",
        f"seed={seed}",
    ]
    try:
        done = subprocess.run(
            command, capture_output=True, text=True, timeout=seconds + 60, check=False
        )
    except subprocess.TimeoutExpired:
        raise HarnessError(f"wrk did not finish: {' '.join(command)}") from None
    with log.open("a", encoding="utf-8") as f:
        f.write(f"$ {' '.join(command)}\n{done.stdout}{done.stderr}\n")
    for line in done.stdout.splitlines():
        if line.startswith("BENCH_JSON "):
            return json.loads(line.removeprefix("BENCH_JSON "))
    raise HarnessError(f"wrk exited {done.returncode} without numbers; see {log}")


def fill(cell: Cell, numbers: dict[str, Any]) -> Cell:
    """`cell` with wrk's numbers; rps counts only successful (status < 400) responses."""
    cell.duration_s = numbers["duration_us"] / 1e6
    cell.requests = numbers["requests"]
    cell.non2xx = numbers["non2xx"]
    cell.socket_errors = sum(
        numbers[k] for k in ("connect_errors", "read_errors", "write_errors", "timeouts")
    )
    cell.rps = (cell.requests - cell.non2xx) / cell.duration_s if cell.duration_s else 0.0
    for name in ("p50", "p90", "p99", "max"):
        setattr(cell, f"{name}_ms", numbers[f"{name}_us"] / 1000)
    return cell

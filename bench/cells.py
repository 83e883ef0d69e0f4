"""The cells of `bench/run.py` (owns measuring one server): start it, check its answer,
warm it up, drive it with wrk at each concurrency, and turn what wrk saw into `Cell`s; the
main cells (torchgate against the naive server) and the cache cell (cache on against cache
off), each in alternating rounds on fresh servers; and the V2 cell.
"""

from __future__ import annotations

import json
import os
import sys
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torchserve
from load import V2_ROWS, Cell, Workload, fill, run_wrk, v2_bodies
from prometheus_client.parser import text_string_to_metric_families
from report import Target, merge_rounds
from servers import (
    BENCH_KEY,
    Server,
    ServerError,
    free_port,
    naive_command,
    post,
    torchgate_command,
)

BENCH = Path(__file__).resolve().parent
FLOORS = {"fastapi-floor": "fastapi", "asgi-floor": "asgi"}


@dataclass(slots=True)
class Plan:
    """How long and how hard to drive each server, and where things go."""

    wrk: str
    threads: int
    seconds: int
    warmup_s: int
    in_process_s: float
    concurrency: list[int]
    rounds: int
    cache_concurrency: int
    cache_rounds: int
    v2_concurrency: int
    log_level: str
    work_dir: Path
    results: Path
    wrk_log: Path


def server_env(**extra: str) -> dict[str, str]:
    """The environment every server gets: no inherited TORCHGATE_* settings, auth on with
    the benchmark's key, and a rate limit no single benchmark client can reach."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TORCHGATE_")}
    env.update(
        {
            "TORCHGATE_API_KEYS": BENCH_KEY,
            "TORCHGATE_RATE_LIMIT": "1000000/second",
            "PYTHONUNBUFFERED": "1",
            **extra,
        }
    )
    return env


def batches(metrics_url: str, model: str) -> tuple[float, float]:
    """(rows, forwards) torchgate has run for `model` so far, from its /metrics."""
    with urllib.request.urlopen(metrics_url, timeout=10) as answer:
        text = answer.read().decode()
    rows = forwards = 0.0
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.labels.get("model") != model:
                continue
            if s.name == "torchgate_batch_size_sum":
                rows += s.value
            elif s.name == "torchgate_batch_size_count":
                forwards += s.value
    return rows, forwards


def answer_check(name: str, answer: np.ndarray, reference: np.ndarray) -> Target:
    if answer.shape != reference.shape:
        return Target(name, "FAIL", f"shape {answer.shape}, expected {reference.shape}")
    diff = float(np.abs(answer - reference).max())
    ok = np.allclose(answer, reference, rtol=1e-4, atol=1e-3)
    return Target(name, "PASS" if ok else "FAIL", f"max |diff| {diff:.2e}")


def drive(plan: Plan, url: str, cell: Cell, lua_args: list[str], *, warm: bool = True) -> Cell:
    if warm:
        run_wrk(plan.wrk, url, cell.concurrency, plan.warmup_s, lua_args, plan.wrk_log)
    numbers = run_wrk(plan.wrk, url, cell.concurrency, plan.seconds, lua_args, plan.wrk_log)
    return fill(cell, numbers)


def measure(
    plan: Plan,
    server: str,
    work: Workload,
    repository: Path,
    *,
    scenario: str = "main",
    concurrency: list[int],
    env: dict[str, str],
    lua_args: list[str],
    round_no: int | None = None,
) -> tuple[list[Cell], list[Target]]:
    """Start one server, check its answer, warm it up and run every concurrency on it.
    `round_no` marks the cells (and names the log) of one round of a cell measured in rounds."""
    port = free_port()
    model_pt = repository / work.model / "1" / "model.pt"
    if server == "torchgate":
        command = torchgate_command(repository, port, plan.threads, plan.log_level)
        url = f"http://127.0.0.1:{port}/v1/models/{work.model}:predict"
    elif server == "torchserve":
        ports = (free_port(), free_port())
        command = torchserve.command(work.model, model_pt, plan.work_dir, port, ports)
        env = {**env, "BENCH_TORCH_THREADS": str(plan.threads)}
        url = f"http://127.0.0.1:{port}/predictions/{work.model}"
    elif server in FLOORS:
        command = [sys.executable, str(BENCH / "floors.py"), "--kind", FLOORS[server]]
        command += ["--port", str(port)]
        url = f"http://127.0.0.1:{port}/predict"
    else:
        command = naive_command(model_pt, port, plan.threads)
        url = f"http://127.0.0.1:{port}/predict"
    suffix = "" if scenario == "main" else f"-{scenario}"
    label, log_suffix = scenario, suffix
    if round_no is not None:
        label, log_suffix = f"{scenario} round {round_no}", f"{suffix}-r{round_no}"
    log = plan.results / f"{server}-{work.model}{log_suffix}.log"
    print(f"-- {server} {work.model} {label}: starting (log {log.name})", flush=True)
    cells = [Cell(server, work.model, scenario, c, round=round_no) for c in concurrency]
    try:
        with Server(
            command, env=env, log_path=log, probe_url=url, probe_body=work.sample_body
        ) as s:
            checks = (
                []  # a floor answers nothing
                if server in FLOORS
                else [v1_answer_check(f"{server} {work.model}{suffix}", s.first_answer, work)]
            )
            if scenario == "cache-on":
                checks.append(cache_hit_check(url, work))
            base = url.split("/", 3)
            metrics_url = f"{base[0]}//{base[2]}/metrics"
            for i, cell in enumerate(cells):
                before = batches(metrics_url, work.model) if server == "torchgate" else None
                drive(plan, url, cell, lua_args, warm=i == 0)
                if before is not None:
                    rows, forwards = (
                        a - b for a, b in zip(batches(metrics_url, work.model), before, strict=True)
                    )
                    cell.batch_size = rows / forwards if forwards else None
                print(f"   c={cell.concurrency}: {cell.rps:,.1f} rps", flush=True)
    except ServerError as exc:
        for cell in cells:
            cell.status = f"error: {exc}"
        return cells, [Target(f"{server} {work.model}{suffix}: starts", "FAIL", str(exc))]
    return cells, checks


def measure_rounds(
    plan: Plan,
    work: Workload,
    repository: Path,
    *,
    variants: list[tuple[str, str, dict[str, str]]],
    rounds: int,
    concurrency: list[int],
    lua_args: list[str],
    stale: list[str],
) -> tuple[list[Cell], list[Target]]:
    """Each (server, scenario, env) of `variants` measured alternately, round after round,
    `rounds` times, every round on a fresh server at every concurrency: on a noisy machine
    one run of each is not a comparison, and alternating spreads any drift over all of
    them. Every round is a cell (with its `round`, and its log named -r1, -r2, ...); the
    checks of all rounds are merged into one line per check (see `merge_rounds`). `stale`
    are glob patterns of an earlier run's logs to remove first."""
    for pattern in stale:
        for old in plan.results.glob(pattern):
            old.unlink()  # an earlier run's logs, maybe of rounds this run will not have
    cells: list[Cell] = []
    per_round: list[tuple[int, list[Target]]] = []
    for round_no in range(1, rounds + 1):
        for server, scenario, env in variants:
            new, checked = measure(
                plan,
                server,
                work,
                repository,
                scenario=scenario,
                concurrency=concurrency,
                env=env,
                lua_args=lua_args,
                round_no=round_no,
            )
            cells += new
            per_round.append((round_no, checked))
    return cells, merge_rounds(per_round, rounds)


def measure_main(
    plan: Plan, work: Workload, repository: Path, *, lua_args: list[str], peers: bool = True
) -> tuple[list[Cell], list[Target]]:
    """The main cells: torchgate against the naive server (and, with `peers`, TorchServe
    and the floors: a do-nothing FastAPI route and a do-nothing plain ASGI app) at every
    `plan.concurrency`, alternately, `plan.rounds` rounds each."""
    servers: tuple[str, ...] = ("torchgate", "naive")
    if peers:
        servers += ("torchserve", *FLOORS)
    return measure_rounds(
        plan,
        work,
        repository,
        variants=[(server, "main", server_env()) for server in servers],
        rounds=plan.rounds,
        concurrency=plan.concurrency,
        lua_args=lua_args,
        stale=[f"{s}-{work.model}{tail}" for s in servers for tail in (".log", "-r*.log")],
    )


def measure_cache(
    plan: Plan, work: Workload, repository: Path, *, lua_args: list[str]
) -> tuple[list[Cell], list[Target]]:
    """torchgate with the cache on against the cache off (TORCHGATE_CACHE_TTL_S=0), measured
    alternately, on, off, on, off, ..., `plan.cache_rounds` rounds each, every round on a
    fresh server at `plan.cache_concurrency` (see `measure_rounds`)."""
    return measure_rounds(
        plan,
        work,
        repository,
        variants=[
            ("torchgate", "cache-on", server_env()),
            ("torchgate", "cache-off", server_env(TORCHGATE_CACHE_TTL_S="0")),
        ],
        rounds=plan.cache_rounds,
        concurrency=[plan.cache_concurrency],
        lua_args=lua_args,
        stale=[f"torchgate-{work.model}-cache-*.log"],
    )


def v1_answer_check(who: str, answer: bytes, work: Workload) -> Target:
    name = f"{who}: answer matches the in-process forward"
    try:
        predictions = np.asarray(json.loads(answer)["predictions"], dtype=np.float32)
    except (KeyError, TypeError, ValueError) as exc:
        return Target(name, "FAIL", f"unreadable answer ({exc!r}): {answer[:200]!r}")
    return answer_check(name, predictions, work.reference)


def cache_hit_check(url: str, work: Workload) -> Target:
    """The sample row, answered once while the server came up, asked again: a hit."""
    _, headers, _ = post(url, work.sample_body, {"Content-Type": "application/json"})
    said = headers.get("x-cache")
    status = "PASS" if said and said.lower().startswith("hit") else "FAIL"
    return Target(
        f"torchgate {work.model} cache-on: a repeated request is a cache hit",
        status,
        f"X-Cache: {said or '(absent)'}",
    )


def v2_outputs(headers: dict[str, str], body: bytes) -> np.ndarray:
    """The first output of a V2 response, JSON or binary."""
    header_length = int(headers.get("inference-header-content-length", len(body)))
    output = json.loads(body[:header_length])["outputs"][0]
    shape = output["shape"]
    if "data" in output:
        return np.asarray(output["data"], dtype=np.float32).reshape(shape)
    size = output["parameters"]["binary_data_size"]
    raw = body[header_length : header_length + size]
    return np.frombuffer(raw, dtype="<f4").reshape(shape)


def measure_v2(
    plan: Plan, work: Workload, repository: Path, module: torch.jit.ScriptModule
) -> tuple[list[Cell], list[Target]]:
    """64-row V2 requests, JSON and binary, on torchgate with the cache off."""
    json_body, binary_body, header_length = v2_bodies(work.rows, plan.work_dir)
    with torch.inference_mode():
        reference = module(torch.from_numpy(work.rows[:V2_ROWS])).numpy()
    port = free_port()
    url = f"http://127.0.0.1:{port}/v2/models/{work.model}/infer"
    variants = [
        ("v2-json", json_body, {"Content-Type": "application/json"}),
        (
            "v2-binary",
            binary_body,
            {
                "Content-Type": "application/octet-stream",
                "Inference-Header-Content-Length": str(header_length),
            },
        ),
    ]
    cells = [Cell("torchgate", work.model, v, plan.v2_concurrency, V2_ROWS) for v, _, _ in variants]
    checks: list[Target] = []
    command = torchgate_command(repository, port, plan.threads, plan.log_level)
    log = plan.results / f"torchgate-{work.model}-v2.log"
    print(f"-- torchgate {work.model} v2: starting (log {log.name})", flush=True)
    try:
        with Server(
            command,
            env=server_env(TORCHGATE_CACHE_TTL_S="0"),
            log_path=log,
            probe_url=f"http://127.0.0.1:{port}/v1/models/{work.model}:predict",
            probe_body=work.sample_body,
        ):
            for cell, (scenario, body, headers) in zip(cells, variants, strict=True):
                status, answer_headers, answer = post(url, body.read_bytes(), headers)
                if status == 404:
                    cell.status = "skipped: endpoint returned 404"
                    continue
                if status != 200:
                    cell.status = f"error: probe returned {status}: {answer[:200]!r}"
                    continue
                try:
                    got = v2_outputs(answer_headers, answer)
                except (KeyError, ValueError, TypeError) as exc:
                    cell.status = f"error: unreadable V2 answer ({exc!r})"
                    continue
                name = f"torchgate {work.model} {scenario}: answer matches the in-process forward"
                checks.append(answer_check(name, got, reference))
                lua_args = [f"body={body}", f"ctype={headers['Content-Type']}"]
                if "Inference-Header-Content-Length" in headers:
                    lua_args.append(f"header=Inference-Header-Content-Length:{header_length}")
                drive(plan, url, cell, lua_args)
                print(f"   {scenario} c={cell.concurrency}: {cell.rps:,.1f} rps", flush=True)
    except ServerError as exc:
        for cell in cells:
            cell.status = f"error: {exc}"
        checks.append(Target(f"torchgate {work.model} v2: starts", "FAIL", str(exc)))
    return cells, checks

"""`make bench`: torchgate against the naive FastAPI server (owns the benchmark of issue 3).

For each model (the bundled `digits`, and `mlp_wide`, written by scripts/make_mlp_wide.py
when missing) it measures the in-process limit of the bare forward, then the main cells:
torchgate and the naive baseline (bench/naive_server.py), each alone, warmed up and driven
with wrk (bench/post.lua) at each concurrency, one row per request, every request's input
unique so the inference cache (on, as shipped) never answers one. The two are measured
alternately, torchgate, naive, torchgate, naive, ..., --rounds times each (3; 1 with
--quick), every round on a fresh server warmed up and run at every concurrency, since one
run of each varies too much on a noisy machine to compare; the table, the torchgate/naive
and torchgate/in-process ratios, the plot and the targets use the median of each server,
model and concurrency over its rounds (the targets print the rounds' values beside it,
every round is a cell of results.json, with its `round`), and the answer checks are one
line per server and model over all rounds.

Extra cells. The cache cell, per model: torchgate with the cache on (as shipped) against
TORCHGATE_CACHE_TTL_S=0, half the requests repeating one of 32 earlier inputs, at
--cache-concurrency (64, the concurrency of the batching targets), in rounds the same way:
on, off, on, off, ..., --cache-rounds times each (3; 1 with --quick), judged on each
scenario's median rps ("cache-on rps >= 1.5x cache-off"). The V2 cell, mlp_wide with
64-row V2 requests, JSON against the binary tensor extension (cache off, same body each
time), skipped while the V2 endpoint answers 404. The image cell (bench/images.py): digits
from JPEG bodies at 64 connections, images/s and the p99 of /health probed meanwhile.

Writes bench/results/results.json, bench/results/bench.png and the servers' logs beside
them (a round's log ends in -r1, -r2, ...: torchgate-digits-r1.log,
torchgate-digits-cache-on-r1.log); prints the table, the ratios and the issue's targets
(PASS/FAIL/SKIP). The exit code is 0 whatever the targets say; 1 when a cell could not be
measured (a server did not start), 2 when the harness itself broke (wrk missing or
failing).

    .venv/bin/python bench/run.py [--quick] [--duration 10] [--models digits,mlp_wide]
                                  [--concurrency 1,16,64] [--rounds 3] [--no-cache-cell]
                                  [--no-v2-cell] [--no-image-cell] [--cache-concurrency 64]
                                  [--cache-rounds 3]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import residency
import torch
from cells import Plan, measure_cache, measure_main, measure_v2
from images import measure_images
from load import (
    Cell,
    HarnessError,
    ensure_wrk,
    in_process_limit,
    load_module,
    workload,
    wrk_version,
)
from overload import measure_overload, step_dict
from report import (
    Target,
    cache_comparisons,
    pair_lines,
    peer_lines,
    peer_targets,
    plot,
    ratio_lines,
    ratios,
    table,
    targets,
)
from servers import single_model_repository

ROOT = Path(__file__).resolve().parent.parent
MODELS = ROOT / "models"
RESULTS = ROOT / "bench" / "results"
MAKE_MLP_WIDE = ROOT / "scripts" / "make_mlp_wide.py"
CACHE_POOL = 32


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} is not a positive integer")
    return value


def _positives(text: str) -> list[int]:
    return sorted({_positive(part) for part in text.split(",") if part.strip()})


def _names(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--duration", type=_positive, help="seconds per cell (default 10, --quick 2)")
    p.add_argument("--models", type=_names, default="digits,mlp_wide", help="comma-separated")
    p.add_argument("--concurrency", type=_positives, default="1,16,64", help="connections")
    p.add_argument("--quick", action="store_true", help="2 s cells, for smoke tests")
    p.add_argument(
        "--rounds",
        type=_positive,
        help="torchgate and naive runs each, alternately, every one on a fresh server at "
        "every concurrency; compared by their medians (default 3, --quick 1)",
    )
    p.add_argument(
        "--torch-threads",
        type=_positive,
        help="for every server and the in-process limit (default: torchgate's rule, half "
        "the cores)",
    )
    p.add_argument("--cache-cell", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument(
        "--cache-concurrency",
        type=_positive,
        default=64,
        help="connections of the cache cell (default 64, the batching targets' concurrency)",
    )
    p.add_argument(
        "--cache-rounds",
        type=_positive,
        help="cache-on and cache-off runs each, alternately, every one on a fresh server; "
        "compared by their medians (default 3, --quick 1)",
    )
    p.add_argument("--v2-cell", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument(
        "--image-cell",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="digits from JPEGs at 64 connections, /health probed meanwhile",
    )
    p.add_argument("--v2-concurrency", type=_positive, default=8, help="64-row requests at once")
    p.add_argument(
        "--server-log-level",
        default="info",
        choices=["debug", "info", "warning", "error"],
        help="torchgate's log level; info (its default: an access-log line per request), as "
        "production runs it",
    )
    p.add_argument(
        "--peers",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="TorchServe and the floors (do-nothing FastAPI route, plain ASGI) in the main cells",
    )
    p.add_argument("--overload-cell", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument(
        "--overload-seconds", type=_positive, help="seconds per overload step (15; --quick 3)"
    )
    p.add_argument(
        "--residency-cell",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="40 models under Zipf traffic, a budget holding 8 against none (bench/residency.py)",
    )
    p.add_argument(
        "--cost",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="the in-process cost of a request (bench/inprocess.py)",
    )
    return p.parse_args(argv)


def ensure_mlp_wide() -> None:
    if (MODELS / "mlp_wide" / "1" / "model.pt").exists():
        return
    print("models/mlp_wide is missing: running scripts/make_mlp_wide.py", flush=True)
    command = [sys.executable, str(MAKE_MLP_WIDE), "--out", str(MODELS / "mlp_wide")]
    if subprocess.run(command, check=False).returncode != 0:
        raise HarnessError("scripts/make_mlp_wide.py failed")


def in_process_costs(quick: bool) -> dict[str, float]:
    """The event loop's CPU per request in process (bench/inprocess.py): miss, hit, refused."""
    requests = "3000" if quick else "20000"
    print(f"-- in-process cost of a request ({requests} each)", flush=True)
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "inprocess.py"), "--requests", requests],
        capture_output=True,
        text=True,
        check=False,
    )
    costs: dict[str, float] = {}
    for line in done.stdout.splitlines():
        label, _, rest = line.partition(":")
        if label in ("miss", "hit", "refused") and "us of event-loop CPU" in rest:
            costs[label] = float(rest.split()[0])
    if not costs:
        print(f"   in-process cost failed: {done.stderr[-400:]}", flush=True)
    return costs


def git_commit() -> str:
    done = subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=False
    )
    return done.stdout.strip() or "unknown"


def bench(args: argparse.Namespace) -> int:
    models, concurrency = args.models, args.concurrency
    RESULTS.mkdir(parents=True, exist_ok=True)
    wrk = ensure_wrk()
    if "mlp_wide" in models:
        ensure_mlp_wide()
    threads = args.torch_threads or max(1, (os.cpu_count() or 2) // 2)
    seconds = args.duration or (2 if args.quick else 10)
    wrk_log = RESULTS / "wrk.log"
    wrk_log.write_text("", encoding="utf-8")
    cells: list[Cell] = []
    checks: list[Target] = []
    overload: dict[str, list[dict[str, Any]]] = {}
    in_process: dict[str, dict[int, float]] = {}
    started = time.time()
    with tempfile.TemporaryDirectory(prefix="torchgate-bench-") as tmp:
        plan = Plan(
            wrk=wrk,
            threads=threads,
            seconds=seconds,
            warmup_s=1 if args.quick else 2,
            in_process_s=0.3 if args.quick else 2.0,
            concurrency=concurrency,
            rounds=args.rounds or (1 if args.quick else 3),
            cache_concurrency=args.cache_concurrency,
            cache_rounds=args.cache_rounds or (1 if args.quick else 3),
            v2_concurrency=args.v2_concurrency,
            log_level=args.server_log_level,
            work_dir=Path(tmp),
            results=RESULTS,
            wrk_log=wrk_log,
        )
        for model in models:
            folder = MODELS / model
            if not (folder / "model.toml").is_file():
                raise HarnessError(f"no model folder {folder}")
            module = load_module(folder / "1" / "model.pt")
            work = workload(model, folder, module, plan.work_dir)
            print(f"-- {model}: in-process limit ({threads} torch threads)", flush=True)
            in_process[model] = in_process_limit(module, work.rows, threads, plan.in_process_s)
            repository = single_model_repository(folder, plan.work_dir)
            main_args = [f"bodies={work.templates}"]
            new, checked = measure_main(
                plan, work, repository, lua_args=main_args, peers=args.peers
            )
            cells += new
            checks += checked
            if args.cache_cell:
                cache_args = [*main_args, "repeat=0.5", f"pool={CACHE_POOL}"]
                new, checked = measure_cache(plan, work, repository, lua_args=cache_args)
                cells += new
                checks += checked
            if model == "mlp_wide" and args.v2_cell:
                new, checked = measure_v2(plan, work, repository, module)
                cells += new
                checks += checked
            if model == "digits" and args.image_cell:
                new, checked = measure_images(plan, repository)
                cells += new
                checks += checked
            if args.overload_cell:
                step_s = args.overload_seconds or (3 if args.quick else 15)
                variants = (False, True) if model == "mlp_wide" else (False,)
                for rate_limited in variants:
                    steps, checked = measure_overload(
                        plan, work, repository, rate_limited=rate_limited, seconds=step_s
                    )
                    overload.setdefault(model, []).append(
                        {"rate_limited": rate_limited, "steps": [step_dict(s) for s in steps]}
                    )
                    checks += checked
    many: list[dict[str, Any]] = []
    if args.residency_cell:
        print("-- many models: 40 under Zipf traffic, a budget of 8 against none", flush=True)
        many = residency.measure(seconds)
        bad = residency.problems(many)
        checks.append(
            Target(
                "many models: every answer 200 and right",
                "FAIL" if bad else "PASS",
                "; ".join(bad) or f"{sum(int(c['requests']) for c in many):,} requests",
            )
        )
    costs = in_process_costs(args.quick) if args.cost else {}

    ratio = ratios(cells, in_process, concurrency)
    verdicts = targets(cells) + peer_targets(cells, in_process, costs)
    print()
    print(table(cells))
    print()
    print(ratio_lines(ratio, in_process, plan.rounds))
    print(pair_lines(cells))
    print(peer_lines(cells))
    if many:
        print(residency.table(many))
    for label, value in costs.items():
        print(f"digits in process: a {label} costs {value:.1f} us of the event loop")
    print()
    for target in checks + verdicts:
        print(f"{target.status:<4}  {target.name}: {target.detail}")
    plot(cells, in_process, RESULTS / "bench.png")
    results: dict[str, Any] = {
        "meta": {
            "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
            "commit": git_commit(),
            "cpu_count": os.cpu_count(),
            "machine": platform.machine(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "wrk": wrk_version(wrk),
            "torch_threads": threads,
            "seconds_per_cell": seconds,
            "rounds": plan.rounds,
            "cache_rounds": plan.cache_rounds if args.cache_cell else 0,
            "warmup_s": plan.warmup_s,
            "server_log_level": plan.log_level,
            "rps_counts": "responses with status < 400 per second",
        },
        "cells": [c.as_dict() for c in cells],
        "in_process_rows_per_s": {
            m: {str(b): r for b, r in v.items()} for m, v in in_process.items()
        },
        "ratios": ratio,
        "cache": {c.model: c.as_dict() for c in cache_comparisons(cells)},
        "checks": [t.as_dict() for t in checks],
        "overload": overload,
        "in_process_cost_us": costs,
        "many_models": many,
        "targets": [t.as_dict() for t in verdicts],
    }
    (RESULTS / "results.json").write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    print(f"\nwrote {RESULTS / 'results.json'} and {RESULTS / 'bench.png'}")
    return 1 if any(c.status.startswith("error") for c in cells) else 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        return bench(args)
    except HarnessError as exc:
        print(f"bench: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

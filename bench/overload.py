"""The overload cell of `bench/run.py` (owns it): capacity, then 8x and 16x as many closed-
loop clients, each wrk connection sending again as soon as it is answered.

torchgate serves one model with a queue bound of 128 rows and a 2 s deadline, with rate
limiting off, then on with a key whose limit is far above the load. Each step reports
answers/s, goodput (2xx/s), refusals (503), timeouts (504), 500s, client socket errors,
the p99 of the served requests (from torchgate's histograms: every inference answer
less the error answers, interpolated in their buckets), the p99 and maximum of all
answers (from wrk), and the server's RSS after the step. The issue's targets are judged
on mlp_wide with rate limiting off and reported for the other runs.
"""

from __future__ import annotations

import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from cells import Plan, server_env
from load import Cell, Workload, fill, run_wrk
from prometheus_client.parser import text_string_to_metric_families
from report import Target
from servers import Server, ServerError, free_port, torchgate_command

QUEUE_ROWS = 128
DEADLINE_MS = 2000
STEPS = (("capacity", 64), ("8x", 512), ("16x", 1024))


@dataclass(slots=True)
class Step:
    name: str
    concurrency: int
    cell: Cell
    answers_per_s: float = 0.0
    goodput: float = 0.0
    refused: float = 0.0
    timeouts: float = 0.0
    errors_500: float = 0.0
    served_p99_ms: float | None = None
    rss_mib: float = 0.0
    extra: dict[str, float] = field(default_factory=dict)


def step_dict(step: Step) -> dict[str, object]:
    """A step for results.json."""
    return {
        "step": step.name,
        "concurrency": step.concurrency,
        "answers_per_s": step.answers_per_s,
        "goodput": step.goodput,
        "refused": step.refused,
        "timeouts": step.timeouts,
        "errors_500": step.errors_500,
        "socket_errors": step.cell.socket_errors,
        "served_p99_ms": step.served_p99_ms,
        "all_p99_ms": step.cell.p99_ms,
        "max_ms": step.cell.max_ms,
        "rss_mib": step.rss_mib,
    }


def _metrics(base: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(base + "/metrics", timeout=10) as answer:
        text = answer.read().decode()
    found = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            found[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return found


def _value(metrics: dict, name: str, **labels: str) -> float:
    return metrics.get((name, tuple(sorted(labels.items()))), 0.0)


def _served_p99(before: dict, after: dict, model: str) -> float | None:
    """p99 (ms) of the 2xx answers of a step: every answer's buckets less the errors'."""
    bounds: dict[float, float] = {}
    for (name, labels), value in after.items():
        label = dict(labels)
        if label.get("model") != model or "le" not in label:
            continue
        le = float(label["le"])
        if name == "ai_request_latency_seconds_bucket":
            bounds[le] = bounds.get(le, 0.0) + value - before.get((name, labels), 0.0)
        elif name == "torchgate_error_latency_seconds_bucket":
            bounds[le] = bounds.get(le, 0.0) - (value - before.get((name, labels), 0.0))
    if not bounds:
        return None
    ordered = sorted(bounds.items())
    total = ordered[-1][1]
    if total <= 0:
        return None
    wanted, previous_le, previous_count = 0.99 * total, 0.0, 0.0
    for le, count in ordered:
        if count >= wanted:
            if le == float("inf"):
                return previous_le * 1000
            share = (wanted - previous_count) / max(count - previous_count, 1e-9)
            return (previous_le + share * (le - previous_le)) * 1000
        previous_le, previous_count = le, count
    return None


def _rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def _status(request: urllib.request.Request) -> tuple[int, str]:
    """An answer's status and, for an error, its message (never raised)."""
    try:
        with urllib.request.urlopen(request, timeout=5) as answer:
            return answer.status, ""
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode(errors="replace")[:200]
    except OSError as error:
        return 0, str(error)


def _until_answered(request: urllib.request.Request) -> float:
    """Milliseconds until the request is answered 200 (trying every 10 ms, up to the
    deadline and a second): how long what was admitted before kept a new request out."""
    started = time.monotonic()
    while time.monotonic() - started < DEADLINE_MS / 1000 + 1:
        if _status(request)[0] == 200:
            break
        time.sleep(0.01)
    return (time.monotonic() - started) * 1000


def measure_overload(
    plan: Plan, work: Workload, repository: Path, *, rate_limited: bool, seconds: int
) -> tuple[list[Step], list[Target]]:
    label = "rate limit on" if rate_limited else "rate limit off"
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    url = f"{base}/v1/models/{work.model}:predict"
    env = server_env(
        TORCHGATE_MAX_QUEUE_ROWS=str(QUEUE_ROWS),
        TORCHGATE_BATCH_TIMEOUT_MS=str(DEADLINE_MS),
        TORCHGATE_RATE_LIMIT="1000000/second" if rate_limited else "off",
    )
    tag = "on" if rate_limited else "off"
    log = plan.results / f"torchgate-{work.model}-overload-{tag}.log"
    command = torchgate_command(repository, port, plan.threads, plan.log_level)
    print(f"-- torchgate {work.model} overload ({label}): starting (log {log.name})", flush=True)
    steps: list[Step] = []
    checks: list[Target] = []
    try:
        with Server(
            command, env=env, log_path=log, probe_url=url, probe_body=work.sample_body
        ) as server:
            for name, c in STEPS:
                before = _metrics(base)
                cell = Cell("torchgate", work.model, f"overload-{name}", c)
                numbers = run_wrk(
                    plan.wrk, url, c, seconds, [f"bodies={work.templates}"], plan.wrk_log
                )
                fill(cell, numbers)
                after = _metrics(base)
                step = Step(name, c, cell)
                duration = cell.duration_s or 1.0

                def grown(code: str, b: dict = before, a: dict = after) -> float:
                    labels = {"model": work.model, "status": code}
                    return _value(a, "ai_requests_total", **labels) - _value(
                        b, "ai_requests_total", **labels
                    )

                step.answers_per_s = cell.requests / duration
                step.goodput = grown("200") / duration
                step.refused = grown("503")
                step.timeouts = grown("504")
                step.errors_500 = grown("500")
                step.served_p99_ms = _served_p99(before, after, work.model)
                step.rss_mib = _rss_mib(server.pid)
                steps.append(step)
                print(
                    f"   {name} c={c}: {step.answers_per_s:,.0f} answers/s, goodput "
                    f"{step.goodput:,.0f}/s, 503 {step.refused:,.0f}, 504 {step.timeouts:,.0f}, "
                    f"500 {step.errors_500:,.0f}, socket errors {cell.socket_errors}, served p99 "
                    f"{step.served_p99_ms or 0:.1f} ms, all p99 {cell.p99_ms or 0:.1f} ms, max "
                    f"{cell.max_ms or 0:.0f} ms, RSS {step.rss_mib:.0f} MiB",
                    flush=True,
                )
            ready, _ = _status(urllib.request.Request(base + "/health/ready"))
            request = urllib.request.Request(
                url, data=work.sample_body, headers={"Content-Type": "application/json"}
            )
            request.add_header("Authorization", f"Bearer {server_env()['TORCHGATE_API_KEYS']}")
            answer, said = _status(request)
            recovered_ms = _until_answered(request) if answer != 200 else 0.0
            shown = f"/health/ready {ready}, a prediction at once {answer}"
            if answer != 200:
                shown += f" ({said}); 200 after {recovered_ms:.0f} ms"
            checks.append(
                Target(
                    f"{work.model} overload ({label}): ready and answering right after",
                    "PASS" if ready == 200 and answer == 200 else "FAIL",
                    shown,
                )
            )
    except ServerError as exc:
        return steps, [Target(f"{work.model} overload ({label}): starts", "FAIL", str(exc))]
    checks += targets(work.model, label, steps)
    return steps, checks


def targets(model: str, label: str, steps: list[Step]) -> list[Target]:
    by = {s.name: s for s in steps}
    if set(by) != {"capacity", "8x", "16x"}:
        return [Target(f"{model} overload ({label})", "SKIP", "not every step ran")]
    cap = by["capacity"]
    out = []
    for name in ("8x", "16x"):
        s = by[name]
        ok = s.goodput >= 0.9 * cap.goodput
        out.append(
            Target(
                f"{model} overload ({label}): goodput at {name} >= 90% of capacity",
                "PASS" if ok else "FAIL",
                f"{s.goodput:,.0f}/s vs {cap.goodput:,.0f}/s "
                f"({s.goodput / max(cap.goodput, 1):.0%})",
            )
        )
    s8 = by["8x"]
    if s8.served_p99_ms is not None and cap.served_p99_ms is not None:
        ok = s8.served_p99_ms <= 2 * cap.served_p99_ms
        detail = f"{s8.served_p99_ms:.1f} ms vs {cap.served_p99_ms:.1f} ms"
    else:
        ok, detail = False, "no served p99"
    out.append(
        Target(
            f"{model} overload ({label}): served p99 at 8x <= 2x capacity's",
            "PASS" if ok else "FAIL",
            detail,
        )
    )
    late = max(s.cell.max_ms or 0 for s in steps)
    out.append(
        Target(
            f"{model} overload ({label}): no answer later than the deadline + 100 ms",
            "PASS" if late <= DEADLINE_MS + 100 else "FAIL",
            f"slowest answer {late:.0f} ms (deadline {DEADLINE_MS} ms)",
        )
    )
    bad = sum(s.errors_500 for s in steps)
    sockets = sum(s.cell.socket_errors for s in steps)
    out.append(
        Target(
            f"{model} overload ({label}): no 500s, no socket errors",
            "PASS" if bad == 0 and sockets == 0 else "FAIL",
            f"{bad:.0f} 500s, {sockets} socket errors",
        )
    )
    grew = by["16x"].rss_mib - cap.rss_mib
    out.append(
        Target(
            f"{model} overload ({label}): RSS after 16x within 20 MiB of after capacity",
            "PASS" if grew <= 20 else "FAIL",
            f"{cap.rss_mib:.0f} -> {by['16x'].rss_mib:.0f} MiB ({grew:+.0f})",
        )
    )
    return out

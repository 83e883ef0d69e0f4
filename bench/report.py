"""What `bench/run.py` reports (owns the table, the ratios, the issue's targets, the plot).

Every function here reads measured `Cell`s; nothing here measures.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

from load import Cell

TARGET_CONCURRENCY = 64


@dataclass(slots=True)
class Target:
    """One of the issue's targets: PASS, FAIL or SKIP (not measured), and why."""

    name: str
    status: str
    detail: str

    def as_dict(self) -> dict[str, str]:
        return asdict(self)


def find(cells: Iterable[Cell], server: str, model: str, scenario: str, c: int) -> Cell | None:
    for cell in cells:
        if (cell.server, cell.model, cell.scenario, cell.concurrency) == (
            server,
            model,
            scenario,
            c,
        ):
            return cell if cell.ok else None
    return None


def _num(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def table(cells: list[Cell]) -> str:
    head = (
        f"{'server':<10} {'model':<9} {'scenario':<10} {'conc':>4} {'rps':>10} "
        f"{'p50 ms':>8} {'p99 ms':>8} {'non-2xx':>7} {'errors':>6}"
    )
    lines = [head, "-" * len(head)]
    for c in cells:
        if not c.ok:
            lines.append(
                f"{c.server:<10} {c.model:<9} {c.scenario:<10} {c.concurrency:>4}  {c.status}"
            )
            continue
        lines.append(
            f"{c.server:<10} {c.model:<9} {c.scenario:<10} {c.concurrency:>4} "
            f"{_num(c.rps, 1):>10} {_num(c.p50_ms):>8} {_num(c.p99_ms):>8} "
            f"{c.non2xx:>7} {c.socket_errors:>6}"
        )
    return "\n".join(lines)


def _over(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def ratios(
    cells: list[Cell], in_process: dict[str, dict[int, float]], concurrency: list[int]
) -> dict[str, dict[str, dict[str, float | None]]]:
    """Per model and concurrency: torchgate/naive (rps, p99) and torchgate/in-process limit
    (batch 1 and the best batch size)."""
    out: dict[str, dict[str, dict[str, float | None]]] = {}
    for model, rates in in_process.items():
        best = max(rate for batch, rate in rates.items() if batch > 1)
        per_c: dict[str, dict[str, float | None]] = {}
        for c in concurrency:
            tg = find(cells, "torchgate", model, "main", c)
            naive = find(cells, "naive", model, "main", c)
            tg_rps = tg.rps if tg else None
            per_c[f"c{c}"] = {
                "rps_vs_naive": _over(tg_rps, naive.rps if naive else None),
                "p99_vs_naive": _over(tg.p99_ms if tg else None, naive.p99_ms if naive else None),
                "rps_vs_in_process_b1": _over(tg_rps, rates[1]),
                "rps_vs_in_process_best": _over(tg_rps, best),
            }
        out[model] = per_c
    return out


def pair_lines(cells: list[Cell]) -> str:
    """The extra cells side by side: cache on/off, V2 binary/JSON."""
    lines = []
    for model, label, mine, theirs in (
        ("digits", "digits cache-on/cache-off rps", "cache-on", "cache-off"),
        ("mlp_wide", "mlp_wide cache-on/cache-off rps", "cache-on", "cache-off"),
        ("mlp_wide", "mlp_wide V2 binary/JSON rps", "v2-binary", "v2-json"),
    ):
        a = next((c for c in cells if c.model == model and c.scenario == mine and c.ok), None)
        b = next((c for c in cells if c.model == model and c.scenario == theirs and c.ok), None)
        if a is not None and b is not None and b.rps:
            rows = f", {a.rps * a.rows_per_request:,.0f} rows/s" if a.rows_per_request > 1 else ""
            lines.append(f"{label}: {a.rps / b.rps:.2f}x (c={a.concurrency}{rows})")
    return "\n".join(lines)


def ratio_lines(
    ratio: dict[str, dict[str, dict[str, float | None]]], in_process: dict[str, dict[int, float]]
) -> str:
    def x(value: float | None) -> str:
        return "-" if value is None else f"{value:.2f}x"

    lines = []
    for model, per_c in ratio.items():
        rates = in_process[model]
        best_batch = max((b for b in rates if b > 1), key=rates.__getitem__)
        lines.append(
            f"{model}: in-process limit {rates[1]:,.0f} rows/s at batch 1, "
            f"{rates[best_batch]:,.0f} rows/s at batch {best_batch} (best of 8/16/32/64)"
        )
        for c, r in per_c.items():
            lines.append(
                f"  {c:>4}: torchgate/naive rps {x(r['rps_vs_naive'])}, "
                f"p99 {x(r['p99_vs_naive'])}; torchgate/in-process "
                f"b1 {x(r['rps_vs_in_process_b1'])}, best {x(r['rps_vs_in_process_best'])}"
            )
    return "\n".join(lines)


def _ratio_target(
    name: str, cells: list[Cell], model: str, metric: str, factor: float, better: str
) -> Target:
    c = TARGET_CONCURRENCY
    tg = find(cells, "torchgate", model, "main", c)
    naive = find(cells, "naive", model, "main", c)
    if tg is None or naive is None:
        return Target(name, "SKIP", f"no {model} c={c} cell for both servers")
    mine, theirs = getattr(tg, metric), getattr(naive, metric)
    if better == "higher":
        ok = mine >= factor * theirs
        detail = f"{mine:,.1f} vs {theirs:,.1f} ({mine / theirs:.2f}x, need >= {factor:g}x)"
    else:
        ok = mine <= theirs / factor
        detail = f"{mine:.2f} ms vs {theirs:.2f} ms (need <= {theirs / factor:.2f} ms)"
    return Target(name, "PASS" if ok else "FAIL", detail)


def targets(cells: list[Cell]) -> list[Target]:
    """The issue's targets, each checked against the measured cells."""
    out = [
        _ratio_target(
            "mlp_wide c64: torchgate rps >= 4x naive", cells, "mlp_wide", "rps", 4, "higher"
        ),
        _ratio_target(
            "mlp_wide c64: torchgate p99 <= naive p99 / 3", cells, "mlp_wide", "p99_ms", 3, "lower"
        ),
        _ratio_target("digits c64: torchgate rps >= 3x naive", cells, "digits", "rps", 3, "higher"),
    ]
    for model in ("digits", "mlp_wide"):
        name = f"{model} c1: torchgate p50 within 1 ms of naive"
        tg = find(cells, "torchgate", model, "main", 1)
        naive = find(cells, "naive", model, "main", 1)
        if tg is None or naive is None:
            out.append(Target(name, "SKIP", f"no {model} c=1 cell for both servers"))
            continue
        gap = tg.p50_ms - naive.p50_ms  # type: ignore[operator]
        detail = f"{tg.p50_ms:.2f} ms vs {naive.p50_ms:.2f} ms ({gap:+.2f} ms)"
        out.append(Target(name, "PASS" if gap <= 1.0 else "FAIL", detail))
    for model in ("digits", "mlp_wide"):
        name = f"{model} cache: cache-on rps >= 1.5x cache-off"
        on = next(
            (c for c in cells if c.model == model and c.scenario == "cache-on" and c.ok), None
        )
        off = next(
            (c for c in cells if c.model == model and c.scenario == "cache-off" and c.ok), None
        )
        if on is None or off is None or not off.rps:
            out.append(Target(name, "SKIP", "no cache cells"))
            continue
        ratio = on.rps / off.rps  # type: ignore[operator]
        detail = f"{on.rps:,.1f} vs {off.rps:,.1f} ({ratio:.2f}x, need >= 1.5x)"
        out.append(Target(name, "PASS" if ratio >= 1.5 else "FAIL", detail))
    return out


def plot(cells: list[Cell], in_process: dict[str, dict[int, float]], path: Path) -> None:
    """Throughput and p99 against concurrency, one line per server and model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (rps_ax, p99_ax) = plt.subplots(1, 2, figsize=(12, 4.8))
    colors = {}
    for cell in cells:
        colors.setdefault(cell.model, f"C{len(colors)}")
    lines = sorted({(c.server, c.model) for c in cells if c.scenario == "main"})
    for server, model in lines:
        points = sorted(
            (c.concurrency, c.rps, c.p99_ms)
            for c in cells
            if (c.server, c.model, c.scenario) == (server, model, "main") and c.ok
        )
        if not points:
            continue
        xs = [p[0] for p in points]
        style = {
            "color": colors[model],
            "linestyle": "-" if server == "torchgate" else "--",
            "marker": "o" if server == "torchgate" else "s",
            "label": f"{server} {model}",
        }
        rps_ax.plot(xs, [p[1] for p in points], **style)
        p99_ax.plot(xs, [p[2] for p in points], **style)
    for model, rates in in_process.items():
        rps_ax.axhline(
            max(rates.values()),
            color=colors.get(model, "gray"),
            linestyle=":",
            linewidth=1,
            label=f"in-process limit {model}",
        )
    for ax, title, unit in (
        (rps_ax, "throughput", "requests/s (1 row each)"),
        (p99_ax, "p99 latency", "ms"),
    ):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("concurrent connections")
        ax.set_ylabel(unit)
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)

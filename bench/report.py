"""What `bench/run.py` reports (owns the table, the ratios, the issue's targets, the plot).

Every function here reads measured `Cell`s; nothing here measures. A cell measured in
rounds (the main cells and the cache cell) is reported, compared and judged as the median
of its rounds.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from statistics import median
from typing import Any

from load import Cell

TARGET_CONCURRENCY = 64
CACHE_FACTOR = 1.5
_WORST = {"PASS": 0, "SKIP": 1, "FAIL": 2}


@dataclass(slots=True)
class Target:
    """One of the issue's targets: PASS, FAIL or SKIP (not measured), and why."""

    name: str
    status: str
    detail: str

    def as_dict(self) -> dict[str, str]:
        return asdict(self)


def merge_rounds(per_round: list[tuple[int, list[Target]]], rounds: int) -> list[Target]:
    """The checks of a cell measured in rounds, one per name: the worst status of its
    rounds, and the detail once when every round said the same, else each round's."""
    seen: dict[str, list[tuple[int, Target]]] = {}
    for round_no, checks in per_round:
        for check in checks:
            seen.setdefault(check.name, []).append((round_no, check))
    merged = []
    for name, entries in seen.items():
        status = max((t.status for _, t in entries), key=lambda s: _WORST.get(s, 2))
        details = {t.detail for _, t in entries}
        numbers = [n for n, _ in entries]
        if rounds == 1 and len(entries) == 1:
            detail = entries[0][1].detail
        elif len(details) == 1 and numbers == list(range(1, rounds + 1)):
            detail = f"{entries[0][1].detail} (each of {rounds} rounds)"
        elif len(details) == 1:
            which = "round" if len(numbers) == 1 else "rounds"
            detail = f"{entries[0][1].detail} ({which} {', '.join(map(str, numbers))} of {rounds})"
        else:
            detail = "; ".join(f"round {n}: {t.detail}" for n, t in entries)
        merged.append(Target(name, status, detail))
    return merged


def median_cell(rounds: list[Cell]) -> Cell:
    """One cell for the rounds of a cell: the median rps and latencies of the rounds that
    ran, their requests and errors summed; the first round's error when none ran."""
    ok = [c for c in rounds if c.ok]
    if not ok:
        return rounds[0]
    first = ok[0]
    out = Cell(first.server, first.model, first.scenario, first.concurrency, first.rows_per_request)
    for name in ("rps", "p50_ms", "p90_ms", "p99_ms", "max_ms"):
        setattr(out, name, median(getattr(c, name) for c in ok))
    for name in ("requests", "non2xx", "socket_errors", "duration_s"):
        setattr(out, name, sum(getattr(c, name) for c in ok))
    return out


def collapse_rounds(cells: list[Cell]) -> list[Cell]:
    """`cells` with the rounds of each cell measured in rounds replaced by their
    `median_cell`, where its first round stood."""
    groups: dict[tuple[str, str, str, int], list[Cell]] = {}
    for c in cells:
        if c.round is not None:
            groups.setdefault((c.server, c.model, c.scenario, c.concurrency), []).append(c)
    out = []
    for c in cells:
        if c.round is None:
            out.append(c)
            continue
        group = groups.pop((c.server, c.model, c.scenario, c.concurrency), None)
        if group is not None:
            out.append(median_cell(group))
    return out


@dataclass(slots=True)
class Comparison:
    """Two sides measured in rounds at one model and concurrency (torchgate and naive, or
    cache-on and cache-off), every round of each in order; compared on their medians."""

    model: str
    concurrency: int
    names: tuple[str, str]
    a: list[Cell]
    b: list[Cell]

    @property
    def a_cell(self) -> Cell:
        return median_cell(self.a)

    @property
    def b_cell(self) -> Cell:
        return median_cell(self.b)

    @property
    def a_rps(self) -> float:
        return self.a_cell.rps or 0.0

    @property
    def b_rps(self) -> float:
        return self.b_cell.rps or 0.0

    @property
    def ratio(self) -> float:
        return self.a_rps / self.b_rps

    def rounds_text(self, metric: str = "rps") -> str:
        """ "median of 3 rounds: cache-on 1,234 / 1,300 / 1,190, cache-off 850 / 900 / 870",
        each round's `metric` (rps, or a latency in ms)."""
        digits, unit = (0, "") if metric == "rps" else (2, " ms")

        def each(cells: list[Cell]) -> str:
            values = (f"{getattr(c, metric):,.{digits}f}" if c.ok else "error" for c in cells)
            return " / ".join(values) + unit

        rounds = max(len(self.a), len(self.b))
        if rounds == 1:
            how = "1 round"
        elif all(c.ok for c in self.a + self.b):
            how = f"median of {rounds} rounds"
        else:
            how = f"median of the rounds measured, of {rounds}"
        what = "" if metric == "rps" else f" ({metric.removesuffix('_ms')})"
        a, b = self.names
        return f"{how}{what}: {a} {each(self.a)}, {b} {each(self.b)}"

    def as_dict(self) -> dict[str, Any]:
        def side(cells: list[Cell], rps: float) -> dict[str, Any]:
            return {"median_rps": rps, "rps_by_round": [c.rps if c.ok else None for c in cells]}

        a, b = self.names
        return {
            "concurrency": self.concurrency,
            "rounds": max(len(self.a), len(self.b)),
            a: side(self.a, self.a_rps),
            b: side(self.b, self.b_rps),
            "ratio": self.ratio,
        }


def compare(
    cells: list[Cell], model: str, a: tuple[str, str], b: tuple[str, str], concurrency: int
) -> Comparison | None:
    """The rounds of (server, scenario) `a` against those of `b`, for `model` at
    `concurrency`; None unless both have a measured round and `b`'s median rps is not 0."""

    def side(server: str, scenario: str) -> list[Cell]:
        key = (server, model, scenario, concurrency)
        return [c for c in cells if (c.server, c.model, c.scenario, c.concurrency) == key]

    on, off = side(*a), side(*b)
    if not any(c.ok for c in on) or not any(c.ok for c in off):
        return None
    names = (a[0], b[0]) if a[1] == b[1] else (a[1], b[1])
    comparison = Comparison(model, concurrency, names, on, off)
    return comparison if comparison.b_rps else None


def main_comparison(cells: list[Cell], model: str, concurrency: int) -> Comparison | None:
    """torchgate against naive, the main scenario, `model` at `concurrency`."""
    return compare(cells, model, ("torchgate", "main"), ("naive", "main"), concurrency)


def cache_comparisons(cells: list[Cell]) -> list[Comparison]:
    """Per model with a measured cache-on and cache-off round, in the cells' order."""
    out = []
    for model in dict.fromkeys(c.model for c in cells):
        on = next((c for c in cells if c.model == model and c.scenario == "cache-on"), None)
        if on is None:
            continue
        pair = (on.server, "cache-on"), (on.server, "cache-off")
        comparison = compare(cells, model, *pair, on.concurrency)
        if comparison is not None:
            out.append(comparison)
    return out


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


def _listed(names: list[str]) -> str:
    """ "a", "a and b", "a, b and c"."""
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} and {names[-1]}"


def table(cells: list[Cell]) -> str:
    """One row per cell; a cell measured in rounds is one row, the median of its rounds."""
    rounds: dict[str, int] = {}
    for c in cells:
        if c.round is not None:
            rounds[c.scenario] = max(rounds.get(c.scenario, 0), c.round)
    cells = collapse_rounds(cells)
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
    by_count: dict[int, list[str]] = {}
    for scenario, count in rounds.items():
        if count > 1:
            by_count.setdefault(count, []).append(scenario)
    if by_count:
        which = ", ".join(
            f"{_listed(names)} rows: median of {count} rounds" for count, names in by_count.items()
        )
        lines.append(
            f"({which};\n rps, p50 and p99 each the median of the rounds' own, not one round's; "
            "non-2xx/errors summed;\n each round in results.json)"
        )
    return "\n".join(lines)


def _over(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def ratios(
    cells: list[Cell], in_process: dict[str, dict[int, float]], concurrency: list[int]
) -> dict[str, dict[str, dict[str, float | None]]]:
    """Per model and concurrency: torchgate/naive (rps, p99) and torchgate/in-process limit
    (batch 1 and the best batch size), of the medians of cells measured in rounds."""
    cells = collapse_rounds(cells)
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
    """The extra cells side by side: cache on/off (medians of their rounds), V2 binary/JSON."""
    lines = [
        f"{c.model} cache-on/cache-off rps: {c.ratio:.2f}x (c={c.concurrency}, {c.rounds_text()})"
        for c in cache_comparisons(cells)
    ]
    a = next(
        (c for c in cells if c.model == "mlp_wide" and c.scenario == "v2-binary" and c.ok), None
    )
    b = next((c for c in cells if c.model == "mlp_wide" and c.scenario == "v2-json" and c.ok), None)
    if a is not None and b is not None and b.rps:
        rows = f", {a.rps * a.rows_per_request:,.0f} rows/s" if a.rows_per_request > 1 else ""
        lines.append(f"mlp_wide V2 binary/JSON rps: {a.rps / b.rps:.2f}x (c={a.concurrency}{rows})")
    return "\n".join(lines)


def ratio_lines(
    ratio: dict[str, dict[str, dict[str, float | None]]],
    in_process: dict[str, dict[int, float]],
    rounds: int = 1,
) -> str:
    def x(value: float | None) -> str:
        return "-" if value is None else f"{value:.2f}x"

    lines = []
    if rounds > 1:
        lines.append(f"(torchgate and naive: the medians of {rounds} rounds)")
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
    pair = main_comparison(cells, model, c)
    if pair is None:
        return Target(name, "SKIP", f"no {model} c={c} cell for both servers")
    mine, theirs = getattr(pair.a_cell, metric), getattr(pair.b_cell, metric)
    if better == "higher":
        ok = mine >= factor * theirs
        detail = f"{mine:,.1f} vs {theirs:,.1f} ({mine / theirs:.2f}x, need >= {factor:g}x"
    else:
        ok = mine <= theirs / factor
        detail = f"{mine:.2f} ms vs {theirs:.2f} ms (need <= {theirs / factor:.2f} ms"
    return Target(name, "PASS" if ok else "FAIL", f"{detail}; {pair.rounds_text(metric)})")


def targets(cells: list[Cell]) -> list[Target]:
    """The issue's targets, each checked against the medians of the measured rounds."""
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
        pair = main_comparison(cells, model, 1)
        if pair is None:
            out.append(Target(name, "SKIP", f"no {model} c=1 cell for both servers"))
            continue
        tg, naive = pair.a_cell.p50_ms, pair.b_cell.p50_ms
        gap = tg - naive  # type: ignore[operator]
        detail = f"{tg:.2f} ms vs {naive:.2f} ms ({gap:+.2f} ms; {pair.rounds_text('p50_ms')})"
        out.append(Target(name, "PASS" if gap <= 1.0 else "FAIL", detail))
    comparisons = {c.model: c for c in cache_comparisons(cells)}
    for model in ("digits", "mlp_wide"):
        name = f"{model} cache: cache-on rps >= {CACHE_FACTOR:g}x cache-off"
        comparison = comparisons.get(model)
        if comparison is None:
            out.append(Target(name, "SKIP", "no cache cells"))
            continue
        ratio = comparison.ratio
        detail = (
            f"{comparison.a_rps:,.1f} vs {comparison.b_rps:,.1f} ({ratio:.2f}x, need >= "
            f"{CACHE_FACTOR:g}x; {comparison.rounds_text()})"
        )
        out.append(Target(name, "PASS" if ratio >= CACHE_FACTOR else "FAIL", detail))
    return out


def plot(cells: list[Cell], in_process: dict[str, dict[int, float]], path: Path) -> None:
    """Throughput and p99 against concurrency, one line per server and model (the medians
    of cells measured in rounds)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells = collapse_rounds(cells)
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


def _at_batch(rates: dict[int, float], batch: float) -> float:
    """The in-process rows/s at `batch`, interpolated between the measured batch sizes."""
    sizes = sorted(rates)
    if batch <= sizes[0]:
        return rates[sizes[0]]
    for low, high in zip(sizes, sizes[1:], strict=False):
        if batch <= high:
            share = (batch - low) / (high - low)
            return rates[low] + share * (rates[high] - rates[low])
    return rates[sizes[-1]]


def peer_lines(cells: list[Cell]) -> str:
    """torchgate against TorchServe and the floors, per model and concurrency (medians)."""
    cells = collapse_rounds(cells)
    lines = []
    for model in sorted({c.model for c in cells}):
        for c in sorted({c.concurrency for c in cells if c.model == model}):
            tg = find(cells, "torchgate", model, "main", c)
            if tg is None or not tg.rps:
                continue
            parts = []
            for peer in ("torchserve", "fastapi-floor", "asgi-floor"):
                other = find(cells, peer, model, "main", c)
                if other is not None and other.rps:
                    parts.append(f"{peer} {tg.rps / other.rps:.2f}x")
            if parts:
                lines.append(f"{model} c={c}: torchgate rps over " + ", ".join(parts))
    return "\n".join(lines)


def peer_targets(
    cells: list[Cell], in_process: dict[str, dict[int, float]], costs: dict[str, float]
) -> list[Target]:
    """The targets of the route-table issue (13), on the medians of the rounds."""
    cells = collapse_rounds(cells)
    out: list[Target] = []

    def pair(model: str, peer: str, c: int = TARGET_CONCURRENCY) -> tuple[Cell, Cell] | None:
        a, b = find(cells, "torchgate", model, "main", c), find(cells, peer, model, "main", c)
        return None if a is None or b is None or not a.rps or not b.rps else (a, b)

    def ratio(name: str, model: str, peer: str, factor: float) -> None:
        found = pair(model, peer)
        if found is None:
            out.append(Target(name, "SKIP", f"no {model} c={TARGET_CONCURRENCY} {peer} cell"))
            return
        a, b = found
        ok = a.rps >= factor * b.rps  # type: ignore[operator]
        detail = f"{a.rps:,.1f} vs {b.rps:,.1f} rps ({a.rps / b.rps:.2f}x, need >= {factor:g}x)"  # type: ignore[operator]
        out.append(Target(name, "PASS" if ok else "FAIL", detail))

    ratio(
        "digits c64: torchgate >= 1.0x the do-nothing FastAPI route", "digits", "fastapi-floor", 1.0
    )
    ratio("digits c64: torchgate >= 2x TorchServe", "digits", "torchserve", 2.0)
    found = pair("digits", "torchserve")
    name = "digits c64: torchgate p99 under half of TorchServe's"
    if found is None:
        out.append(Target(name, "SKIP", "no digits c=64 TorchServe cell"))
    else:
        a, b = found
        ok = (a.p99_ms or 0) < (b.p99_ms or 0) / 2
        out.append(
            Target(name, "PASS" if ok else "FAIL", f"{a.p99_ms:.1f} ms vs {b.p99_ms:.1f} ms")
        )
    ratio("mlp_wide c64: torchgate >= 2.5x TorchServe", "mlp_wide", "torchserve", 2.5)
    tg = find(cells, "torchgate", "mlp_wide", "main", TARGET_CONCURRENCY)
    name = "mlp_wide c64: rows/s >= 85% of the in-process limit at the batch size formed"
    if tg is None or not tg.rps or tg.batch_size is None or "mlp_wide" not in in_process:
        out.append(Target(name, "SKIP", "no mlp_wide c=64 torchgate cell with its batch size"))
    else:
        limit = _at_batch(in_process["mlp_wide"], tg.batch_size)
        ok = tg.rps >= 0.85 * limit
        detail = (
            f"{tg.rps:,.0f} rows/s vs {limit:,.0f} in process at batch {tg.batch_size:.1f} "
            f"({tg.rps / limit:.0%})"
        )
        out.append(Target(name, "PASS" if ok else "FAIL", detail))
    for model in ("digits", "mlp_wide"):
        name = f"{model} c1: torchgate p50 no more than 0.2 ms above the naive server's"
        found = pair(model, "naive", 1)
        if found is None:
            out.append(Target(name, "SKIP", f"no {model} c=1 cells"))
            continue
        a, b = found
        gap = (a.p50_ms or 0) - (b.p50_ms or 0)
        detail = f"{a.p50_ms:.2f} ms vs {b.p50_ms:.2f} ms ({gap:+.2f} ms)"
        out.append(Target(name, "PASS" if gap <= 0.2 else "FAIL", detail))
    for label, bound in (("miss", 60.0), ("hit", 25.0)):
        name = f"digits in process: a {label} costs at most {bound:g} us of the event loop"
        value = costs.get(label)
        if value is None:
            out.append(Target(name, "SKIP", "not measured"))
        else:
            out.append(Target(name, "PASS" if value <= bound else "FAIL", f"{value:.1f} us"))
    comparisons = {c.model: c for c in cache_comparisons(cells)}
    comparison = comparisons.get("mlp_wide")
    name = "mlp_wide cache cell: cache on >= 1.3x cache off"
    if comparison is None:
        out.append(Target(name, "SKIP", "no cache cells"))
    else:
        ok = comparison.ratio >= 1.3
        out.append(Target(name, "PASS" if ok else "FAIL", f"{comparison.ratio:.2f}x"))
    return out

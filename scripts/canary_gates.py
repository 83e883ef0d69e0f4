"""The canary's gates, asked of Prometheus: the staging step of the pipeline.

    python scripts/canary_gates.py http://prometheus:9090 [--window 30m] [--min-requests 1000]

Over the last --window of the canary's pods (`torchgate-canary-*` in namespace
torchgate, as README's "Canary releases" queries them): at least --min-requests requests,
an error rate (5xx) under 1 %, and a p99 latency under 500 ms. Exit 0 when every gate
holds; 1 when one fails or Prometheus has no answer (no data is no evidence). Standard
library only.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass

CANARY = 'namespace="torchgate", pod=~"torchgate-canary-.*"'


@dataclass(frozen=True, slots=True)
class Gate:
    name: str
    query: str  # {window} and {canary} are filled in
    limit: float
    at_least: bool = False  # True: the value must be >= limit; False: < limit

    def promql(self, window: str) -> str:
        return self.query.format(canary=CANARY, window=window)


GATES = [
    Gate("requests", "sum(increase(ai_requests_total{{{canary}}}[{window}]))", 1000, True),
    Gate(
        "error rate",
        'sum(rate(ai_requests_total{{{canary}, status=~"5.."}}[{window}]))'
        " / sum(rate(ai_requests_total{{{canary}}}[{window}]))",
        0.01,
    ),
    Gate(
        "p99 latency (s)",
        "histogram_quantile(0.99, sum by (le) "
        "(rate(ai_request_latency_seconds_bucket{{{canary}}}[{window}])))",
        0.5,
    ),
]


def instant(prometheus: str, query: str) -> float | None:
    """One instant query's single value; None when it has no result."""
    url = prometheus.rstrip("/") + "/api/v1/query?" + urllib.parse.urlencode({"query": query})
    with urllib.request.urlopen(url, timeout=30) as response:
        answer = json.load(response)
    if answer.get("status") != "success":
        raise ValueError(answer.get("error", "query failed"))
    result = answer["data"]["result"]
    if not result:
        return None
    value = float(result[0]["value"][1])
    return None if math.isnan(value) else value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("prometheus", help="Prometheus' base URL")
    parser.add_argument("--window", default="30m", help="PromQL range to judge (30m)")
    parser.add_argument("--min-requests", type=float, default=GATES[0].limit)
    args = parser.parse_args(argv)
    limits = {"requests": args.min_requests}
    failed = 0
    for gate in GATES:
        limit = limits.get(gate.name, gate.limit)
        try:
            value = instant(args.prometheus, gate.promql(args.window))
        except (urllib.error.URLError, OSError, ValueError, KeyError) as exc:
            print(f"canary: FAIL: {gate.name}: Prometheus did not answer ({exc})")
            failed += 1
            continue
        holds = value is not None and (value >= limit if gate.at_least else value < limit)
        bound = f"{'>=' if gate.at_least else '<'} {limit:g}"
        shown = "no data" if value is None else f"{value:.4g}"
        print(f"canary: {'PASS' if holds else 'FAIL'}: {gate.name} {shown} (must be {bound})")
        if not holds:
            failed += 1
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

"""The metric names torchgate's Grafana dashboard and alert rules query.

`metric_names()` reads them out of the PromQL itself, so a test against a live server can
check that every series the monitoring relies on is really exported.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
MONITORING = ROOT / "k8s" / "monitoring"
DASHBOARD = MONITORING / "torchgate-dashboard.json"
RULES = MONITORING / "rules.yml"

# Series Prometheus makes itself at scrape time; no server exports them.
SYNTHETIC = frozenset({"up"})
HISTOGRAM_SUFFIXES = ("_bucket", "_count", "_sum")
KEYWORDS = frozenset(
    {
        "and",
        "or",
        "unless",
        "by",
        "without",
        "on",
        "ignoring",
        "group_left",
        "group_right",
        "bool",
        "offset",
        "inf",
        "nan",
    }
)

_STRING = re.compile(r'"(?:\\.|[^"\\])*"|\'(?:\\.|[^\'\\])*\'|`[^`]*`')
_MATCHERS = re.compile(r"\{[^{}]*\}")
_RANGE = re.compile(r"\[[^\[\]]*\]")
_GROUPING = re.compile(
    r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)", re.IGNORECASE
)
_VARIABLE = re.compile(r"\$\{[^}]*\}|\$\w+")
_IDENTIFIER = re.compile(r"(?<![\w:.$])([A-Za-z_:][\w:]*+)(?!\s*\()")
_LABEL_VALUES = re.compile(r"label_values\(\s*([A-Za-z_:][\w:]*)")


def base_name(name: str) -> str:
    """`x_bucket`, `x_count`, `x_sum` -> `x`: the name a histogram is exported under."""
    for suffix in HISTOGRAM_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def names_in(expr: str) -> set[str]:
    """Every metric name a PromQL expression selects, histogram suffixes kept."""
    text = _STRING.sub('""', expr)
    text = _VARIABLE.sub("", text)
    text = _MATCHERS.sub("", text)
    text = _RANGE.sub("", text)
    text = _GROUPING.sub("", text)
    return {m for m in _IDENTIFIER.findall(text) if m.lower() not in KEYWORDS}


def dashboard_exprs(path: Path = DASHBOARD) -> list[str]:
    """The PromQL of every panel target, rows' nested panels included."""
    dashboard = json.loads(path.read_text())
    exprs: list[str] = []

    def walk(panels: list[dict]) -> None:
        for panel in panels:
            exprs.extend(t["expr"] for t in panel.get("targets", []) if t.get("expr"))
            walk(panel.get("panels", []))

    walk(dashboard["panels"])
    return exprs


def dashboard_variable_metrics(path: Path = DASHBOARD) -> set[str]:
    """Metrics the dashboard's `label_values(metric, label)` variables read."""
    dashboard = json.loads(path.read_text())
    names: set[str] = set()
    for variable in dashboard.get("templating", {}).get("list", []):
        query = variable.get("query")
        if isinstance(query, dict):
            query = query.get("query", "")
        names.update(_LABEL_VALUES.findall(query or ""))
    return names


def rule_exprs(path: Path = RULES) -> list[str]:
    """The PromQL of every alerting and recording rule."""
    groups = yaml.safe_load(path.read_text())["groups"]
    return [rule["expr"] for group in groups for rule in group["rules"]]


def metric_names() -> set[str]:
    """Every base metric name the dashboard and rules use, as the server would export it."""
    raw: set[str] = set(dashboard_variable_metrics())
    for expr in dashboard_exprs() + rule_exprs():
        raw |= names_in(expr)
    return {base_name(n) for n in raw} - SYNTHETIC

"""What `/metrics` says after real traffic: every counter at its exact expected value,
lint-clean for `promtool check metrics`, and carrying every series the Grafana dashboard
and the alert rules query."""

from __future__ import annotations

import asyncio
import subprocess
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import httpx
import numpy as np
import pytest

from tests.deploy.promql_names import metric_names
from tests.support import (
    Doubler,
    ServerThread,
    copy_digits,
    doubler_toml,
    metric,
    promtool,
    slow_row,
    started,
    until_started,
    write_model,
)
from torchgate.config import Settings

pytestmark = pytest.mark.slow  # every test here takes a second or more

DOUBLER = "/v1/models/doubler:predict"
DIGITS = "/v1/models/digits:predict"
ROUTE = "/v1/models/{name}:predict"
QUEUE_ROWS = 4  # the doubler's queue bound: a burst while a slow row runs must overflow it
# Being added by another change (input drift); until it is, the one name allowed missing.
NOT_YET_EXPORTED = "ai_model_drift_score"


def row(i: int) -> list[float]:
    return [float(i), 0.5, -1.0, 2.0]


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    write_model(tmp_path, "doubler", Doubler(), doubler_toml(max_queue_rows=QUEUE_ROWS))
    copy_digits(tmp_path)
    return tmp_path


class Traffic:
    """Sends requests and remembers what each inference answer should have counted."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.client = httpx.Client(base_url=url, timeout=60)
        self.answers: list[tuple[str, httpx.Response]] = []  # (model label, response)

    def post(self, path: str, model: str, **kwargs: object) -> httpx.Response:
        answer = self.client.post(path, **kwargs)
        self.answers.append((model, answer))
        return answer

    def statuses(self, model: str) -> Counter[int]:
        return Counter(a.status_code for m, a in self.answers if m == model)

    def cache_headers(self, model: str) -> Counter[str]:
        return Counter(a.headers.get("x-cache", "-") for m, a in self.answers if m == model)

    def burst_while_busy(self, burst: int) -> list[httpx.Response]:
        """A slow doubler row holds the runner; `burst` distinct rows arrive meanwhile."""

        async def go() -> list[httpx.Response]:
            limits = httpx.Limits(max_connections=burst + 1)
            async with httpx.AsyncClient(base_url=self.url, timeout=60, limits=limits) as client:
                before = await started(client, "doubler")
                slow = asyncio.create_task(client.post(DOUBLER, json={"instances": [slow_row(30)]}))
                await until_started(client, "doubler", before + 1)  # it holds the runner
                rest = await asyncio.gather(
                    *(
                        client.post(DOUBLER, json={"instances": [row(1000 + i)]})
                        for i in range(burst)
                    )
                )
                return [await slow, *rest]

        answers = asyncio.run(go())
        self.answers += [("doubler", a) for a in answers]
        return answers

    def close(self) -> None:
        self.client.close()


def drive(traffic: Traffic, repo: Path) -> dict[str, object]:
    """Good, cached, malformed, unknown-model, unmatched, failed, shed and labelled
    requests; returns what was observed where the server's timing decides."""
    t = traffic
    for i in range(5):  # good: five distinct rows, all misses
        answer = t.post(DOUBLER, "doubler", json={"instances": [row(i)]})
        assert answer.status_code == 200 and answer.headers["x-cache"] == "MISS"
    cached = t.post(DOUBLER, "doubler", json={"instances": [row(0)]})
    assert cached.status_code == 200 and cached.headers["x-cache"] == "HIT"

    malformed = [
        t.post(
            DOUBLER, "doubler", content=b"{not json", headers={"content-type": "application/json"}
        ),
        t.post(DOUBLER, "doubler", json={"instances": [[1.0, 2.0, 3.0]]}),
        t.post(DOUBLER, "doubler", json={"rows": [row(1)]}),
    ]
    assert [a.status_code for a in malformed] == [400, 400, 400]

    unknown = t.post("/v1/models/nosuch:predict", "_unknown", json={"instances": [row(1)]})
    assert unknown.status_code == 404
    unmatched = t.client.get("/no/such/page")
    assert unmatched.status_code == 404

    failed = t.post(DOUBLER, "doubler", json={"instances": [[666.0, 0.0, 0.0, 0.0]]})
    assert failed.status_code == 500

    burst = t.burst_while_busy(12)
    shed = sum(a.status_code == 503 for a in burst)
    assert burst[0].status_code == 200  # the slow row itself
    assert {a.status_code for a in burst} <= {200, 503}
    assert shed >= 1, "the burst never overflowed the queue: the slow row ran too fast"

    x = np.load(repo / "digits" / "validation.npz")["x"][:12]
    labels: Counter[str] = Counter()
    for chunk in np.split(x, 3):
        answer = t.post(DIGITS, "digits", json={"instances": chunk.tolist()})
        assert answer.status_code == 200
        labels.update(answer.json()["labels"])
    return {"shed": shed, "labels": labels, "digits_rows": len(x)}


@pytest.fixture
def served(repo: Path, make_settings: Callable[..., Settings]):
    """A server over `repo` after `drive()`: its /metrics text and what was observed."""
    with ServerThread(make_settings(models=repo)) as server:
        traffic = Traffic(server.url)
        try:
            observed = drive(traffic, repo)
            text = traffic.client.get("/metrics").text
        finally:
            traffic.close()
    return text, traffic, observed


def test_every_counter_is_at_its_exact_value_after_mixed_traffic(served):
    text, traffic, observed = served
    shed = observed["shed"]

    # ai_requests_total: one per inference answer, by model label and status
    expected = {
        ("doubler", 200): 5 + 1 + 1 + (12 - shed),  # good, cached, slow row, burst served
        ("doubler", 400): 3,
        ("doubler", 500): 1,
        ("doubler", 503): shed,
        ("_unknown", 404): 1,
        ("digits", 200): 3,
    }
    for model in ("doubler", "digits", "_unknown"):
        for status, count in traffic.statuses(model).items():
            assert expected[(model, status)] == count
    for (model, status), count in expected.items():
        assert metric(text, "ai_requests_total", model=model, status=str(status)) == count, (
            model,
            status,
        )
    assert metric(text, "ai_request_latency_seconds_count", model="doubler") == sum(
        count for (model, _), count in expected.items() if model == "doubler"
    )

    # cache: lookups per row; shed and failed rows were looked up and missed
    assert traffic.cache_headers("doubler")["HIT"] == 1
    assert metric(text, "torchgate_cache_requests_total", model="doubler", result="hit") == 1
    misses = 5 + 1 + 1 + 12  # good, the poisoned row, the slow row, the burst
    assert metric(text, "torchgate_cache_requests_total", model="doubler", result="miss") == misses
    digits_lookups = metric(
        text, "torchgate_cache_requests_total", model="digits", result="hit"
    ) + metric(text, "torchgate_cache_requests_total", model="digits", result="miss")
    assert digits_lookups == observed["digits_rows"]

    # shedding: exactly the 503s the burst saw, nothing past a deadline
    assert metric(text, "torchgate_shed_total", model="doubler", reason="queue_full") == shed
    assert metric(text, "torchgate_shed_total", model="doubler", reason="deadline") == 0

    # HTTP by route template: unmatched paths and unknown models never mint labels
    assert (
        metric(text, "torchgate_http_requests_total", route="unmatched", method="GET", status="404")
        == 1
    )
    assert "/no/such/page" not in text and "nosuch" not in text
    by_status = Counter(a.status_code for _, a in traffic.answers)
    for status, count in by_status.items():
        assert (
            metric(
                text,
                "torchgate_http_requests_total",
                route=ROUTE,
                method="POST",
                status=str(status),
            )
            == count
        )

    # predictions: one per row, by the top label each answer reported
    labels: Counter[str] = observed["labels"]
    assert sum(labels.values()) == observed["digits_rows"]
    for label, count in labels.items():
        assert metric(text, "ai_predictions_total", model="digits", **{"class": label}) == count
    assert not any(
        line.startswith("ai_predictions_total{") and 'model="doubler"' in line
        for line in text.splitlines()
    )


def test_live_metrics_pass_promtool_check_metrics(served):
    text, _, _ = served
    checked = subprocess.run(
        [promtool(), "check", "metrics"],
        input=text,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert (checked.returncode, checked.stdout, checked.stderr) == (0, "", "")


def exposed_names(text: str) -> set[str]:
    """Names that have at least one sample, histogram suffixes folded into the base name."""
    names: set[str] = set()
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name = line.split("{", 1)[0].split(" ", 1)[0]
            names.add(name)
            for suffix in ("_bucket", "_count", "_sum"):
                if name.endswith(suffix):
                    names.add(name[: -len(suffix)])
    return names


def test_every_metric_the_dashboard_and_rules_query_is_exported(served):
    text, _, _ = served
    missing = metric_names() - exposed_names(text)
    # ai_model_drift_score is another engineer's change in progress: until torchgate
    # defines it, it is the one name allowed to be missing; once defined, nothing is.
    allowed = set() if f"# TYPE {NOT_YET_EXPORTED} " in text else {NOT_YET_EXPORTED}
    assert missing == allowed, f"queried by k8s/monitoring but not exported: {sorted(missing)}"

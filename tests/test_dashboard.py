"""The built-in dashboard: the sampler's arithmetic under an injected clock, the two
routes, and the page itself rendered by headless Chromium against a server under load."""

from __future__ import annotations

import asyncio
import re
import shutil
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from prometheus_client import CollectorRegistry

from tests.browser import Browser, chromium
from tests.support import (
    Doubler,
    ServerThread,
    doubler_toml,
    eventually,
    slow_row,
    until,
    write_model,
)
from torchgate.config import Settings
from torchgate.metrics import Metrics
from torchgate.sampler import Sampler, quantile

SCREENSHOT_COPY = Path("/tmp/torchgate-dashboard.png")
SCREENSHOTS = Path("/tmp")  # torchgate-dashboard-<width>.png, for a person to look at


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def metrics() -> Metrics:
    return Metrics(CollectorRegistry(), version="test")


# the sampler ------------------------------------------------------------------------------


def test_first_sample_is_the_baseline_then_rates_are_per_second(metrics: Metrics):
    clock = FakeClock()
    sampler = Sampler(metrics, clock=clock)
    metrics.requests.labels("m", "200").inc(7)  # before the baseline: never counted
    assert sampler.sample() is None and list(sampler.samples) == []

    metrics.requests.labels("m", "200").inc(90)
    metrics.requests.labels("m", "404").inc(6)
    metrics.requests.labels("other", "503").inc(4)
    clock.now += 2.0
    sample = sampler.sample()

    assert sample is not None
    assert sample.t == 2.0 and sample.interval_s == 2.0
    assert sample.rps == 50.0
    assert sample.error_rate == 0.04  # 5xx only: 4 of 100
    assert sample.refused_rate == 0.06 and sample.limited_rate == 0.0
    assert sample.status == {"2xx": 45.0, "4xx": 3.0, "429": 0.0, "5xx": 2.0}
    assert sample.counts == {"2xx": 90, "4xx": 6, "429": 0, "5xx": 4}
    assert list(sampler.samples) == [sample]


def test_rate_limited_answers_are_counted_apart_from_other_refusals(metrics: Metrics):
    clock = FakeClock()
    sampler = Sampler(metrics, clock=clock)
    sampler.sample()
    metrics.requests.labels("m", "200").inc(25)
    metrics.requests.labels("_unknown", "429").inc(70)  # refused at the edge: no model yet
    metrics.requests.labels("m", "400").inc(4)
    metrics.requests.labels("_unknown", "401").inc(1)
    clock.now += 1.0
    sample = sampler.sample()
    assert sample is not None
    assert sample.counts == {"2xx": 25, "4xx": 5, "429": 70, "5xx": 0}
    assert sample.refused_rate == 0.05 and sample.limited_rate == 0.7
    assert sample.error_rate == 0.0


def test_percentiles_interpolate_within_the_latency_buckets(metrics: Metrics):
    clock = FakeClock()
    sampler = Sampler(metrics, clock=clock)
    metrics.latency.labels("m").observe(0.003)  # before the baseline: left out
    sampler.sample()
    latency = metrics.latency.labels("m")
    for _ in range(40):
        latency.observe(0.02)  # bucket (0.015, 0.025]
    for _ in range(50):
        latency.observe(0.04)  # bucket (0.035, 0.05]
    for _ in range(10):
        metrics.latency.labels("other").observe(0.3)  # bucket (0.25, 0.35], another model
    clock.now += 1.0
    sample = sampler.sample()

    assert sample is not None
    # rank 50 of 100: 10 into the 50 of (0.035, 0.05]
    assert sample.p50_ms == pytest.approx((0.035 + 0.015 * 10 / 50) * 1000)
    # rank 95: 5 into the 10 of (0.25, 0.35]; rank 99: 9 into them
    assert sample.p95_ms == pytest.approx((0.25 + 0.1 * 5 / 10) * 1000)
    assert sample.p99_ms == pytest.approx((0.25 + 0.1 * 9 / 10) * 1000)


def test_quantile_edges():
    assert quantile(0.5, []) is None
    assert quantile(0.5, [(0.1, 0.0), (float("inf"), 0.0)]) is None
    assert quantile(0.5, [(0.1, 4.0), (float("inf"), 4.0)]) == pytest.approx(0.05)
    # past the highest finite bound: reported at that bound, as histogram_quantile does
    assert quantile(0.99, [(0.1, 1.0), (1.0, 1.0), (float("inf"), 10.0)]) == 1.0


def test_capacity_gauges_batch_fill_cache_and_breakers(metrics: Metrics):
    clock = FakeClock()
    limits = {("m", "1"): 8, ("m", "2"): 4}
    sampler = Sampler(metrics, clock=clock, batch_limits=lambda: limits)
    sampler.sample()
    for rows in (4, 4, 8):
        metrics.batch_size.labels("m", "1").observe(rows)  # fills 0.5, 0.5, 1.0
    metrics.batch_size.labels("m", "2").observe(1)  # fill 0.25
    metrics.cache_requests.labels("m", "hit").inc(3)
    metrics.cache_requests.labels("m", "miss").inc(1)
    metrics.shed.labels("m", "queue_full").inc(4)
    metrics.queue_rows.labels("m", "1").set(5)
    metrics.queue_rows.labels("m", "2").set(2)
    metrics.inflight.inc(3)
    metrics.models_loaded.set(2)
    metrics.circuit_state.labels("m", "1").set(0)
    metrics.circuit_state.labels("m", "2").set(2)
    clock.now += 2.0
    sample = sampler.sample()

    assert sample is not None
    assert sample.batch_fill == pytest.approx((0.5 + 0.5 + 1.0 + 0.25) / 4)
    assert sample.forwards_per_s == 2.0
    assert sample.cache_hit_rate == 0.75
    assert sample.shed_per_s == 2.0
    assert (sample.queue_rows, sample.inflight, sample.models_loaded) == (7.0, 3.0, 2.0)
    assert sample.breakers == {"m/1": "closed", "m/2": "open"}


def test_an_idle_interval_has_zero_rates_and_no_ratios(metrics: Metrics):
    clock = FakeClock()
    sampler = Sampler(metrics, clock=clock)
    sampler.sample()
    clock.now += 1.0
    sample = sampler.sample()
    assert sample is not None
    assert sample.rps == 0.0 and sample.forwards_per_s == 0.0
    assert sample.error_rate is None and sample.cache_hit_rate is None
    assert (sample.p50_ms, sample.p95_ms, sample.p99_ms, sample.batch_fill) == (None,) * 4


def test_a_series_that_restarts_counts_its_whole_new_value(metrics: Metrics):
    clock = FakeClock()
    sampler = Sampler(metrics, clock=clock, batch_limits=lambda: {("m", "1"): 4})
    for _ in range(5):
        metrics.batch_size.labels("m", "1").observe(4)
    sampler.sample()
    metrics.forget_version("m", "1")  # unloaded and loaded again: the series starts at 0
    metrics.batch_size.labels("m", "1").observe(2)
    clock.now += 1.0
    sample = sampler.sample()
    assert sample is not None
    assert sample.forwards_per_s == 1.0 and sample.batch_fill == 0.5


def test_now_summarises_the_last_minute_by_default(metrics: Metrics):
    clock = FakeClock()
    sampler = Sampler(metrics, clock=clock)
    sampler.sample()
    metrics.requests.labels("m", "200").inc(120)  # a burst, then a minute less a second idle
    metrics.requests.labels("_unknown", "429").inc(30)
    clock.now += 1.0
    sampler.sample()
    for _ in range(59):
        clock.now += 1.0
        sampler.sample()
    assert sampler.now is not None and sampler.now.interval_s == 60.0
    assert sampler.now.counts["2xx"] == 120 and sampler.now.counts["429"] == 30
    assert sampler.now.rps == 2.5 and sampler.now.limited_rate == 0.2
    assert sampler.samples[-1].rps == 0.0  # the last second alone: idle
    clock.now += 1.0
    sampler.sample()  # a minute on, the burst has left the summary
    assert sampler.now.counts["2xx"] == 0 and sampler.now.rps == 0.0


def test_ring_buffer_keeps_the_window_and_now_spans_the_last_intervals(metrics: Metrics):
    clock = FakeClock()
    sampler = Sampler(metrics, clock=clock, window=3, now_window=2)
    sampler.sample()
    for rps in (1, 2, 3, 4, 5):
        metrics.requests.labels("m", "200").inc(rps)
        clock.now += 1.0
        sampler.sample()
    assert [s.rps for s in sampler.samples] == [3.0, 4.0, 5.0]
    assert sampler.now is not None and sampler.now.rps == 4.5  # (4 + 5) over 2 s
    assert [s.t for s in sampler.since(3.0)] == [4.0, 5.0]
    assert len(sampler.since(None)) == 3


def test_the_background_task_samples_until_closed(metrics: Metrics):
    async def run() -> int:
        sampler = Sampler(metrics, interval_s=0.01)
        sampler.start()
        await until(lambda: len(sampler.samples) >= 3)
        await sampler.aclose()
        taken = len(sampler.samples)
        await asyncio.sleep(0.05)  # pacing: time for a stray sample to show, if one came
        assert len(sampler.samples) == taken
        return taken

    assert asyncio.run(run()) >= 3


# the routes -------------------------------------------------------------------------------


@pytest.fixture
def doubler(tmp_path: Path) -> Path:
    write_model(tmp_path, "doubler", Doubler(), doubler_toml(max_batch_size=8))
    return tmp_path


def test_page_is_self_contained_under_a_strict_policy(doubler, make_settings):
    with ServerThread(make_settings(models=doubler)) as server:
        page = httpx.get(server.url + "/dashboard")
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    policy = page.headers["content-security-policy"]
    assert "default-src 'none'" in policy and "script-src 'sha256-" in policy
    assert "unsafe-inline" not in policy
    html = page.text
    assert "<script src=" not in html and "fetch(`dashboard/data" in html
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", html)  # nothing from elsewhere
    for view in ("overview", "latency", "errors", "capacity"):
        assert f'id="{view}"' in html


@pytest.mark.slow
def test_data_is_incremental_within_one_boot(doubler, make_settings):
    with ServerThread(make_settings(models=doubler)) as server:
        for i in range(3):
            httpx.post(server.url + "/predict", json={"instances": [[i, 1.0, 2.0, 3.0]]})
        deadline = time.monotonic() + 10
        while True:
            full = httpx.get(server.url + "/dashboard/data").json()
            if len(full["samples"]) >= 2 or time.monotonic() > deadline:
                break
            time.sleep(0.2)  # pacing: a poll
        assert full["interval_s"] == 1.0 and full["window"] == 300
        assert full["now"]["breakers"] == {"doubler/1": "closed"}
        assert sum(s["rps"] * s["interval_s"] for s in full["samples"]) == pytest.approx(
            3, abs=0.01
        )
        first = full["samples"][0]["t"]
        newer = httpx.get(
            server.url + "/dashboard/data", params={"boot": full["boot"], "since": first}
        ).json()
        assert [s["t"] for s in newer["samples"]][: len(full["samples"]) - 1] == [
            s["t"] for s in full["samples"][1:]
        ]
        stale = httpx.get(
            server.url + "/dashboard/data", params={"boot": "another-server", "since": 1e9}
        ).json()
        assert len(stale["samples"]) >= len(full["samples"])  # a new boot gets everything


@pytest.mark.slow
def test_dashboard_is_open_like_metrics_unless_metrics_require_a_key(doubler, make_settings):
    with ServerThread(make_settings(models=doubler, auth="on", api_keys="k" * 32)) as server:
        assert httpx.get(server.url + "/dashboard").status_code == 200
        assert httpx.get(server.url + "/dashboard/data").status_code == 200
    locked = make_settings(models=doubler, auth="on", api_keys="k" * 32, metrics_require_key=True)
    with ServerThread(locked) as server:
        assert httpx.get(server.url + "/dashboard").status_code == 401
        assert httpx.get(server.url + "/dashboard/data").status_code == 401
        keyed = httpx.get(server.url + "/dashboard/data", headers={"x-api-key": "k" * 32})
        assert keyed.status_code == 200


# the page in a real browser ---------------------------------------------------------------


def browse(binary: str, url: str, profile: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [
            binary,
            "--headless=new",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--no-first-run",
            "--hide-scrollbars",
            f"--user-data-dir={profile}",
            "--window-size=1400,1000",
            "--virtual-time-budget=6000",
            *extra,
            url,
        ],
        capture_output=True,
        text=True,
        timeout=90,
    )


@pytest.fixture
def loaded_server(doubler: Path, make_settings: Callable[..., Settings]) -> Iterator[str]:
    """A server with a background client sending a mix of requests until the test ends."""
    stop = threading.Event()

    def load(url: str) -> None:
        with httpx.Client(base_url=url, timeout=30) as client:
            i = 0
            while not stop.is_set():
                i += 1
                if i % 25 == 0:
                    instances = [[666.0, 0.0, 0.0, 0.0]]  # a model failure: 500
                elif i % 40 == 0:
                    instances = [slow_row(1)]  # ~50 ms: some queueing behind it
                elif i % 3 == 0:
                    instances = [[1.0, 2.0, 3.0, 4.0]]  # repeated: cache hits
                else:
                    instances = [[float(i), 1.0, 2.0, 3.0], [float(-i), 0.0, 0.0, 1.0]]
                client.post("/predict", json={"instances": instances})
                if i % 30 == 0:
                    client.post("/predict", json={"rows": []})  # 400
                time.sleep(0.005)  # pacing

    with ServerThread(make_settings(models=doubler)) as server:
        workers = [threading.Thread(target=load, args=(server.url,)) for _ in range(2)]
        for worker in workers:
            worker.start()
        try:
            time.sleep(3.0)  # pacing: a few seconds of history before the page opens
            yield server.url
        finally:
            stop.set()
            for worker in workers:
                worker.join(timeout=30)


def figure(dom: str, element_id: str) -> float:
    match = re.search(rf'id="{element_id}"[^>]*data-value="([^"]*)"', dom)
    assert match, f"#{element_id} has no value in the rendered page"
    return float(match.group(1))


@pytest.mark.slow
def test_page_shows_live_rps_and_latency_in_chromium(loaded_server: str, tmp_path: Path):
    binary = chromium()
    url = loaded_server + "/dashboard"
    dumped = browse(binary, url, tmp_path / "profile-dom", "--dump-dom")
    assert dumped.returncode == 0, dumped.stderr[-2000:]
    dom = dumped.stdout
    assert 'class="live"' in dom, "the page never got its data"
    assert figure(dom, "rps") > 0
    for percentile in ("p50", "p95", "p99"):
        assert figure(dom, percentile) > 0
    assert figure(dom, "p50") <= figure(dom, "p95") <= figure(dom, "p99")
    assert figure(dom, "models-loaded") == 1
    assert "doubler/1 closed" in dom

    screenshot = tmp_path / "dashboard.png"
    shot = browse(binary, url, tmp_path / "profile-shot", f"--screenshot={screenshot}")
    assert shot.returncode == 0, shot.stderr[-2000:]
    assert screenshot.stat().st_size > 20_000  # a drawn page, not a blank one
    shutil.copyfile(screenshot, SCREENSHOT_COPY)


# after a burst with refusals, rate limits and failures -------------------------------------


@pytest.fixture
def burst_server(doubler: Path, make_settings: Callable[..., Settings]) -> Iterator[str]:
    """A server (60 requests a minute per address) after a burst of 90 requests: 400s,
    500s, then 429s once the limit is spent; idle since."""
    with ServerThread(make_settings(models=doubler, rate_limit="60/minute")) as server:
        with httpx.Client(base_url=server.url, timeout=30) as client:
            for i in range(90):
                if i % 9 == 4:
                    body: object = {"instances": [[666.0, 0.0, 0.0, 0.0]]}  # the model fails
                elif i % 9 == 7:
                    body = {"instances": [[1.0, 2.0]]}  # the wrong row shape
                else:
                    body = {"instances": [[float(i % 4), 1.0, 2.0, 3.0]]}
                client.post("/predict", json=body)
        # the sampler's readings take the whole burst in
        eventually(lambda: sampled(httpx.get(server.url + "/dashboard/data").json()) >= 90)
        yield server.url


def sampled(data: dict) -> int:
    """How many answers the dashboard's samples have counted."""
    return sum(sum(s["counts"].values()) for s in data["samples"])


def answers_by_class(metrics_text: str) -> dict[str, int]:
    """`ai_requests_total` summed over models by the dashboard's status classes."""
    found = dict.fromkeys(("2xx", "4xx", "429", "5xx"), 0)
    for line in metrics_text.splitlines():
        match = re.match(r'^ai_requests_total\{.*status="(\d+)".*\} (\S+)$', line)
        if match:
            status = match.group(1)
            found[status if status == "429" else f"{status[0]}xx"] += int(float(match.group(2)))
    return found


# what a person sees: nothing wider than the window, no clipped label or number, and where
# the tiles and sections are
LAYOUT = """(() => {
  const clipped = (el) => el.scrollWidth > el.clientWidth + 1;
  const box = (el) => el.getBoundingClientRect();
  const text = [...document.querySelectorAll(
    '.tile .label, .tile .value, .tile .sub, figcaption, h2')];
  const legendItems = [...document.querySelectorAll('.legend span')].filter((item) =>
    box(item).right > box(item.parentElement).right + 1);
  const values = {};
  for (const el of document.querySelectorAll('[data-value]')) values[el.id] = el.dataset.value;
  const legends = {};
  for (const el of document.querySelectorAll('.legend')) legends[el.id] = el.textContent;
  return {
    overflow: document.documentElement.scrollWidth - window.innerWidth,
    clipped: text.filter(clipped).map((el) => el.textContent.trim()),
    legendOverflow: legendItems.map((el) => el.textContent),
    tileWidths: [...document.querySelectorAll('.tile')].map((el) => box(el).width),
    tileRows: new Set([...document.querySelectorAll('.tile')].map((el) => box(el).top)).size,
    canvasWidths: [...document.querySelectorAll('canvas')].map((el) => box(el).width),
    sections: Object.fromEntries([...document.querySelectorAll('section')].map(
      (el) => [el.id, [box(el).left, box(el).width]])),
    values, legends,
    span: document.getElementById('overview-span').textContent,
    filled: document.querySelector('main').getBoundingClientRect().bottom / window.innerHeight,
  };
})()"""


@pytest.mark.slow
def test_dashboard_after_a_burst_counts_the_refusals_and_reads_at_every_width(
    burst_server: str, tmp_path: Path
):
    url = burst_server + "/dashboard"
    counted = answers_by_class(httpx.get(burst_server + "/metrics").text)
    assert counted["4xx"] > 0 and counted["429"] > 0 and counted["5xx"] > 0
    total = sum(counted.values())
    assert total == 90

    with Browser(tmp_path / "profile") as browser:
        for width, mobile in ((1400, False), (760, False), (390, True)):
            browser.open(url, width, mobile=mobile)
            browser.wait_for("document.getElementById('answered').dataset.value === '90'")
            page = browser.evaluate(LAYOUT)

            # the numbers on the page are /metrics' (the burst is all within the minute)
            values = {k: float(v) for k, v in page["values"].items() if v != ""}
            assert values["answered"] == total
            for cls in ("4xx", "429", "5xx"):
                assert values[f"count-{cls}"] == counted[cls], cls
            assert values["error-rate"] == pytest.approx(100 * counted["5xx"] / total, abs=1e-3)
            assert values["refused-rate"] == pytest.approx(100 * counted["4xx"] / total, abs=1e-3)
            assert values["limited-rate"] == pytest.approx(100 * counted["429"] / total, abs=1e-3)
            assert 0 < values["p50"] <= values["p95"] <= values["p99"]
            assert values["models-loaded"] == 1
            status_legend = page["legends"]["legend-status"]
            for cls in ("2xx", "4xx", "429", "5xx"):
                assert f"{cls}{counted[cls]} (" in status_legend, status_legend
            assert page["span"].startswith("last")

            # readable at this width
            assert page["overflow"] <= 0, (width, page["overflow"])
            assert page["clipped"] == [], (width, page["clipped"])
            assert page["legendOverflow"] == [], (width, page["legendOverflow"])
            assert min(page["tileWidths"]) >= 120, (width, page["tileWidths"])
            assert min(page["canvasWidths"]) >= 250, (width, page["canvasWidths"])
            latency, answers = page["sections"]["latency"], page["sections"]["errors"]
            assert page["filled"] >= 0.85, (width, page["filled"])  # no empty half page
            if width == 1400:
                assert page["tileRows"] == 1  # every tile in one row
                assert answers[0] > latency[0] + latency[1] - 1  # side by side
            else:
                assert answers[0] == latency[0] and answers[1] == latency[1]  # one column
            if width in (1400, 760):
                shot = SCREENSHOTS / f"torchgate-dashboard-{width}.png"
                browser.screenshot(shot)
                assert shot.stat().st_size > 30_000  # a drawn page, not a blank one

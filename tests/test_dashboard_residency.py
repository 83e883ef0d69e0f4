"""The dashboard's resident set: the sampler reads the loaded versions, the memory held
against the budget, loads and evictions; the page lists them, readable at every width."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
from prometheus_client import CollectorRegistry

from tests.api.test_residency_server import ROW, Weighted, predict, save, toml
from tests.browser import Browser
from tests.support import ServerThread
from torchgate.metrics import Metrics
from torchgate.sampler import Sampler

MIB = 2**20


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_the_sampler_reads_the_resident_set_and_what_came_and_went():
    metrics = Metrics(CollectorRegistry(), version="test")
    clock = FakeClock()
    sampler = Sampler(metrics, clock=clock)
    metrics.model_loads.labels("a", "startup", "ok").inc()  # before the baseline
    sampler.sample()
    metrics.model_loads.labels("b", "on_demand", "ok").inc(3)
    metrics.model_loads.labels("c", "on_demand", "failed").inc()
    metrics.model_loads.labels("c", "on_demand", "no_room").inc()
    metrics.model_evictions.labels("a").inc(2)
    metrics.resident_bytes.labels("b", "1").set(3 * MIB)
    metrics.resident_bytes.labels("b", "2").set(MIB)
    metrics.memory_resident.labels("cpu").set(4 * MIB)
    metrics.memory_budget.labels("cpu").set(8 * MIB)
    clock.now += 1.0
    sample = sampler.sample()
    assert sample is not None
    assert sample.resident == {"b/1": 3 * MIB, "b/2": MIB}
    assert (sample.memory_bytes, sample.memory_budget_bytes) == (4 * MIB, 8 * MIB)
    assert (sample.loads, sample.load_failures, sample.evictions) == (3, 1, 2)


def test_no_budget_is_none():
    metrics = Metrics(CollectorRegistry(), version="test")
    clock = FakeClock()
    sampler = Sampler(metrics, clock=clock)
    sampler.sample()
    clock.now += 1.0
    sample = sampler.sample()
    assert sample is not None and sample.memory_budget_bytes is None and sample.resident == {}


PAGE = """(() => {
  const box = (el) => el.getBoundingClientRect();
  const section = document.getElementById('residency');
  return {
    overflow: document.documentElement.scrollWidth - window.innerWidth,
    chips: [...document.querySelectorAll('#resident .chip')].map((el) => el.textContent),
    held: document.getElementById('memory-held').dataset.value,
    budget: document.getElementById('memory-budget').dataset.value,
    loads: document.getElementById('loads').dataset.value,
    evictions: document.getElementById('evictions').dataset.value,
    canvas: box(document.getElementById('chart-memory')).width,
    inside: [...section.querySelectorAll('*')].every((el) => box(el).right <= box(section).right + 1),
  };
})()"""


@pytest.mark.slow
def test_the_page_lists_the_resident_set(tmp_path: Path, make_settings):
    repo = tmp_path / "models"
    for i in range(4):
        save(repo, f"m{i}", Weighted(float(i), 256 * 1024), toml())
    size = (repo / "m0" / "1" / "model.pt").stat().st_size
    settings = make_settings(models=repo, model_memory_bytes=2 * size + size // 2)
    with ServerThread(settings) as server, httpx.Client(base_url=server.url, timeout=60) as c:
        for i in (0, 1, 2, 3):
            assert predict(c, f"m{i}", ROW).status_code == 200  # m0 and m1 evicted
        loaded = sorted(
            e["name"] for e in c.post("/v2/repository/index", json={"ready": True}).json()
        )
        assert loaded == ["m2", "m3"]
        with Browser(tmp_path / "profile") as browser:
            for width, mobile in ((1400, False), (760, False), (390, True)):
                browser.open(server.url + "/dashboard", width, mobile=mobile)
                browser.wait_for("document.getElementById('evictions').dataset.value === '2'")
                page = browser.evaluate(PAGE)
                assert sorted(page["chips"]) == ["m2/1 1.00 MiB", "m3/1 1.00 MiB"]
                assert float(page["budget"]) == pytest.approx(settings.model_memory_bytes / MIB)
                assert 0 < float(page["held"]) <= float(page["budget"])
                assert page["loads"] == "4" and page["evictions"] == "2"
                assert page["overflow"] <= 0 and page["inside"], (width, page)
                assert page["canvas"] >= 250
                if width == 1400:
                    browser.screenshot(Path("/tmp/torchgate-dashboard-residency.png"))

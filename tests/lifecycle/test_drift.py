"""`DriftMonitor`: PSI against the bundled digits reference, the ring of recent rows, and
the background scorer."""

from __future__ import annotations

import asyncio
import math
import sys
from pathlib import Path

import numpy as np
import pytest
from prometheus_client import CollectorRegistry, generate_latest

from tests.support import MODELS, ROOT, metric
from torchgate.lifecycle import drift
from torchgate.lifecycle.drift import DriftMonitor, DriftScorer, Reference
from torchgate.metrics import Metrics

VALIDATION = np.load(MODELS / "digits" / "validation.npz")
REFERENCE = Reference.read(MODELS / "digits")


def monitor(**options: object) -> DriftMonitor:
    assert REFERENCE is not None
    return DriftMonitor("digits", REFERENCE, Metrics(CollectorRegistry(), version="t"), **options)


def scored(m: DriftMonitor) -> float:
    return m.score(*m.snapshot()).score


def test_held_out_rows_score_low_and_shifted_rows_high():
    x = VALIDATION["x"]
    same = monitor()
    for row in x:  # one request per row, as clients send them
        same.observe(row[np.newaxis], np.array([0]))
    assert scored(same) < 0.1
    for shifted in (x + 4, np.clip(x + 4, 0, 16)):
        moved = monitor()
        moved.observe(shifted)
        assert scored(moved) > 0.25


def test_binning_matches_the_training_script(tmp_path: Path):
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        from train_digits import reference_bins
    finally:
        sys.path.remove(str(ROOT / "scripts"))
    x = VALIDATION["x"]
    np.savez(tmp_path / "reference.npz", **reference_bins(x))
    reference = Reference.read(tmp_path)
    flat = x.reshape(len(x), -1).astype(np.float64)
    np.testing.assert_allclose(reference.window_shares(flat), reference.shares)
    assert reference.psi(flat).max() < 1e-9


def test_chunked_binning_gives_the_same_shares(monkeypatch: pytest.MonkeyPatch):
    flat = VALIDATION["x"].reshape(450, -1).astype(np.float64)
    whole = REFERENCE.window_shares(flat)
    monkeypatch.setattr(drift, "_CHUNK_ELEMENTS", 1000)
    np.testing.assert_array_equal(REFERENCE.window_shares(flat), whole)


def test_the_ring_keeps_the_last_rows():
    m = monitor(size=100, min_rows=10)
    rows = np.arange(250 * 64, dtype=np.float32).reshape(250, 1, 8, 8)
    classes = np.arange(250)
    for start in range(0, 250, 7):
        m.observe(rows[start : start + 7], classes[start : start + 7])
    held, kept = m.snapshot()
    assert len(held) == 100
    assert sorted(kept.tolist()) == list(range(150, 250))
    np.testing.assert_array_equal(held[np.argsort(kept)], rows[150:].reshape(100, 64))
    m.observe(rows, classes)  # more rows than the ring holds at once: the last 100
    held, kept = m.snapshot()
    assert sorted(kept.tolist()) == list(range(150, 250))


def test_too_few_rows_score_nan_and_wrong_widths_are_ignored():
    m = monitor()
    m.observe(VALIDATION["x"][:50])
    m.observe(np.zeros((5, 3), dtype=np.float32))
    report = m.score(*m.snapshot())
    assert math.isnan(report.score) and report.rows == 50


def test_missing_or_broken_reference(tmp_path: Path):
    assert Reference.read(tmp_path) is None
    np.savez(tmp_path / "reference.npz", edges=np.zeros((4, 11)), shares=np.zeros((3, 10)))
    assert Reference.read(tmp_path) is None


def test_the_scorer_refreshes_the_gauge_off_the_request_path():
    metrics = Metrics(CollectorRegistry(), version="t")
    m = DriftMonitor("digits", REFERENCE, metrics)

    def gauge() -> float:
        return metric(
            generate_latest(metrics.registry).decode(), "ai_model_drift_score", model="digits"
        )

    assert math.isnan(gauge())  # exported from the start: not enough rows to tell yet

    async def run() -> None:
        scorer = DriftScorer(lambda: [m], interval_s=0.01)
        scorer.start()
        m.observe(VALIDATION["x"] + 4)
        for _ in range(200):
            await asyncio.sleep(0.01)  # pacing: a poll
            if not math.isnan(gauge()):
                break
        await scorer.aclose()

    asyncio.run(run())
    assert gauge() > 0.25 and not m.due
    assert m.latest is not None and m.latest.predicted == {}
    m.close()
    assert "ai_model_drift_score{" not in generate_latest(metrics.registry).decode()

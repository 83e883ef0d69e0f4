"""`DriftMonitor`: how far a model's recent inputs have moved from the data it was trained
on, as `ai_model_drift_score{model}`.

A model folder may hold `reference.npz` (written by the training script): per input
feature (the first input's values, flattened), the quantile bin edges of the training
inputs (`edges`, [features, bins + 1]) and the share of training rows in each bin
(`shares`, [features, bins]). The server keeps the last `size` (1000) input rows in a
ring, and the drift score is the mean over features of the population stability index
between the reference shares and the window's shares in the same bins:

    PSI = sum over bins of (actual - expected) * ln(actual / expected)

with both shares floored at 1e-4 so that an empty bin does not make it infinite. Read it
as the usual rule of thumb does: under 0.1 no drift, 0.1 to 0.25 moderate, over 0.25
significant (the "drift detected" alert in k8s/monitoring fires on > 0.25 held 15 m).

The request path only copies rows into the ring (and the predicted classes beside
them); the score is computed off the loop, in a thread, by `DriftScorer` every few
seconds when new rows came in. Until the window holds `min_rows` rows the score is NaN:
too few rows to tell.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from torchgate.metrics import Metrics
from torchgate.periodic import Periodic
from torchgate.serving.repository import ModelFolder

log = logging.getLogger("torchgate.drift")

FILE = "reference.npz"
EPSILON = 1e-4
# elements of the [rows, features, edges] comparison done at once: bounds the memory
_CHUNK_ELEMENTS = 8_000_000


@dataclass(frozen=True, slots=True)
class Reference:
    """The training inputs' bins: per feature, its inner edges and the share in each bin."""

    inner: np.ndarray  # [features, bins - 1]: each feature's distinct inner edges, +inf padded
    shares: np.ndarray  # [features, bins]

    @property
    def features(self) -> int:
        return self.shares.shape[0]

    @classmethod
    def read(cls, folder: Path) -> Reference | None:
        """The folder's `reference.npz`, or None when it has none or it is unusable."""
        path = folder / FILE
        if not path.is_file():
            return None
        try:
            with np.load(path, allow_pickle=False) as data:
                edges = np.asarray(data["edges"], dtype=np.float64)
                shares = np.asarray(data["shares"], dtype=np.float64)
        except (OSError, ValueError, KeyError) as exc:
            log.warning("drift reference unusable", extra={"path": str(path), "problem": str(exc)})
            return None
        if edges.ndim != 2 or shares.shape != (edges.shape[0], edges.shape[1] - 1):
            log.warning("drift reference has inconsistent shapes", extra={"path": str(path)})
            return None
        # as the training script binned: duplicate quantiles (a pixel that is nearly
        # always 0) merge, so a value goes to the bin after every edge <= it
        inner = np.full((edges.shape[0], shares.shape[1] - 1), np.inf)
        for f, row in enumerate(edges[:, 1:-1]):
            distinct = np.unique(row)
            inner[f, : len(distinct)] = distinct
        return cls(inner, shares)

    def same_as(self, other: Reference) -> bool:
        return np.array_equal(self.inner, other.inner) and np.array_equal(self.shares, other.shares)

    def window_shares(self, rows: np.ndarray) -> np.ndarray:
        """The share of `rows` ([n, features]) in each reference bin: [features, bins]."""
        features, bins = self.shares.shape
        counts = np.empty((features, bins))
        step = max(1, _CHUNK_ELEMENTS // max(1, len(rows) * self.inner.shape[1]))
        for start in range(0, features, step):
            stop = min(features, start + step)
            index = (rows[:, start:stop, None] >= self.inner[None, start:stop]).sum(axis=2)
            offsets = index + np.arange(stop - start) * bins
            counts[start:stop] = np.bincount(
                offsets.ravel(), minlength=(stop - start) * bins
            ).reshape(stop - start, bins)
        return counts / max(1, len(rows))

    def psi(self, rows: np.ndarray) -> np.ndarray:
        """Each feature's population stability index of `rows` against the reference."""
        actual = np.maximum(self.window_shares(rows), EPSILON)
        expected = np.maximum(self.shares, EPSILON)
        return ((actual - expected) * np.log(actual / expected)).sum(axis=1)


@dataclass(slots=True)
class DriftReport:
    """A score over the window as it was: the mean PSI, per feature, and predictions."""

    score: float
    rows: int
    psi: np.ndarray  # per feature
    predicted: dict[int, float]  # class -> share of the window's rows


class DriftMonitor:
    """The recent inputs of one model and their latest drift score."""

    def __init__(
        self,
        model: str,
        reference: Reference,
        metrics: Metrics,
        *,
        size: int = 1000,
        min_rows: int = 100,
    ) -> None:
        self.model = model
        self.reference = reference
        self.size = size
        self.min_rows = min_rows
        self.latest: DriftReport | None = None
        self._gauge = metrics.drift_score.labels(model)
        self._gauge.set(math.nan)
        self._metrics = metrics
        # each request's rows as they came (at most `size` requests, so at least `size`
        # rows): appending is O(1) on the request path; the window is assembled only
        # when a score is due
        self._recent: deque[tuple[np.ndarray, np.ndarray | None]] = deque(maxlen=size)
        self._seen = 0  # rows observed ever: a new score is due when it moved
        self._scored = 0

    @classmethod
    def serving(
        cls,
        folder: ModelFolder,
        reference: Reference | None,
        previous: DriftMonitor | None,
        metrics: Metrics,
    ) -> DriftMonitor | None:
        """The monitor for a folder about to be served: none without a reference (or with
        one that does not fit the first input); `previous` when its reference is the same,
        so a reload keeps the window."""
        if reference is None:
            return None
        if not folder.config.batched or folder.config.inputs[0].row_elements != reference.features:
            log.warning(
                "reference.npz does not match the model's first input: no drift score",
                extra={"model": folder.name, "features": reference.features},
            )
            return None
        if previous is not None and previous.reference.same_as(reference):
            return previous
        return cls(folder.name, reference, metrics)

    def observe(self, rows: np.ndarray, classes: np.ndarray | None = None) -> None:
        """Keep a request's rows ([n, ...]) and their top classes for the window: O(1)."""
        if rows.ndim == 0 or rows.size != len(rows) * self.reference.features:
            return
        self._recent.append((rows, classes))
        self._seen += len(rows)

    @property
    def due(self) -> bool:
        """Whether rows came in since the last score."""
        return self._seen != self._scored

    def snapshot(self) -> tuple[np.ndarray, np.ndarray]:
        """The window's last `size` rows and classes (-1: unknown), taken on the loop for a
        thread to score."""
        self._scored = self._seen
        recent = list(self._recent)
        if not recent:
            empty = np.zeros((0, self.reference.features), dtype=np.float32)
            return empty, np.zeros(0, dtype=np.int64)
        rows = np.concatenate([r.reshape(len(r), -1) for r, _ in recent]).astype(np.float32)
        classes = np.concatenate(
            [np.full(len(r), -1, dtype=np.int64) if c is None else c for r, c in recent]
        )
        return rows[-self.size :], classes[-self.size :].astype(np.int64, copy=False)

    def score(self, rows: np.ndarray, classes: np.ndarray) -> DriftReport:
        """The drift report of a snapshot (CPU work: run it in a thread)."""
        if len(rows) < self.min_rows:
            return DriftReport(math.nan, len(rows), np.zeros(0), {})
        psi = self.reference.psi(rows.astype(np.float64))
        known = classes[classes >= 0]
        values, counts = np.unique(known, return_counts=True)
        predicted = {int(v): float(c) / len(known) for v, c in zip(values, counts, strict=True)}
        return DriftReport(float(psi.mean()), len(rows), psi, predicted)

    async def refresh(self) -> DriftReport | None:
        """Score the window now if rows came in since the last score; set the gauge."""
        if self.due:
            rows, classes = self.snapshot()
            self.latest = await asyncio.to_thread(self.score, rows, classes)
            self._gauge.set(self.latest.score)
        return self.latest

    def close(self) -> None:
        self._metrics.forget_drift(self.model)


class DriftScorer:
    """The background task that refreshes every monitor's score every `interval_s`."""

    def __init__(
        self, monitors: Callable[[], list[DriftMonitor]], *, interval_s: float = 5.0
    ) -> None:
        self.monitors = monitors
        self._periodic = Periodic("drift-scorer", interval_s, self._step)

    def start(self) -> None:
        self._periodic.start()

    async def aclose(self) -> None:
        await self._periodic.aclose()

    async def _step(self) -> None:
        for monitor in self.monitors():
            try:
                await monitor.refresh()
            except Exception:  # one model's bad rows must not stop the others' scores
                log.exception("drift score failed", extra={"model": monitor.model})

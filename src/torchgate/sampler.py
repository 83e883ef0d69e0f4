"""`Sampler`: the server's own recent history, behind the built-in `/dashboard` page.

Once a second a background task reads torchgate's metric objects, diffs them against the
previous reading, and keeps one `Sample` per interval in a ring buffer (five minutes by
default), and one more over the last minute (`now`: what the page's tiles and legends
show). Answers are counted by status class, 429 apart from the other 4xx, so refusals
show beside errors. The resident set (`serving.residency`: the versions loaded and their
bytes, the budget, loads and evictions) is read the same way. Percentiles come from the
latency histogram's bucket deltas, interpolated linearly within a bucket as PromQL's
`histogram_quantile` does. The work is a few dict walks a second, off the request path:
the page's `GET /dashboard/data` only serializes what the sampler already computed.
"""

from __future__ import annotations

import logging
import math
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

from prometheus_client.metrics import MetricWrapperBase

from torchgate.metrics import Metrics
from torchgate.periodic import Periodic
from torchgate.serving.breaker import BreakerState

log = logging.getLogger("torchgate.dashboard")

QUANTILES = (0.5, 0.95, 0.99)
# answers by status class; 429 (rate limited) apart from the other refusals
STATUS_CLASSES = ("2xx", "4xx", "429", "5xx")
# A series key: the sample's name, then its label values in the metric's label order.
Series = tuple[str, ...]
BatchLimits = Callable[[], Mapping[tuple[str, str], int]]


@dataclass(slots=True)
class Sample:
    """What the server did over one interval; rates are per second, latencies in ms.

    A ratio or percentile is None when the interval had nothing to take it over.
    """

    t: float  # seconds since the sampler started, at the end of the interval
    interval_s: float
    rps: float  # inference requests answered per second
    error_rate: float | None  # share of them answered with a 5xx status
    refused_rate: float | None  # share refused with a 4xx status other than 429
    limited_rate: float | None  # share refused with 429 (rate limited)
    status: dict[str, float]  # answers per second by class: 2xx, 4xx (not 429), 429, 5xx
    counts: dict[str, int]  # answers in the interval by the same classes
    p50_ms: float | None
    p95_ms: float | None
    p99_ms: float | None
    inflight: float  # HTTP requests being served at the end of the interval
    models_loaded: float
    breakers: dict[str, str]  # "model/version" -> closed, half_open or open
    queue_rows: float
    batch_fill: float | None  # mean rows per forward over max_batch_size
    forwards_per_s: float
    cache_hit_rate: float | None
    shed_per_s: float
    resident: dict[str, float]  # "model/version" -> bytes it holds, for each loaded version
    memory_bytes: float  # held by loaded models and loads in progress, every device
    memory_budget_bytes: float | None  # every device's budget; None: no budget
    loads: int  # models loaded in the interval
    load_failures: int
    evictions: int


Values = dict[Series, float]


@dataclass(slots=True)
class _Reading:
    at: float
    counters: dict[str, Values]  # by role: requests, latency, batches, cache, shed
    gauges: dict[str, Values]  # by role: inflight, models, breakers, queue


def quantile(q: float, buckets: Iterable[tuple[float, float]]) -> float | None:
    """The `q` quantile of a histogram given as (upper bound, cumulative count) pairs in
    ascending order, +Inf last; None when it is empty. Within a bucket observations are
    taken as spread evenly; one in the +Inf bucket is reported at the highest finite bound."""
    pairs = list(buckets)
    total = pairs[-1][1] if pairs else 0.0
    if total <= 0:
        return None
    rank = q * total
    lower, below = 0.0, 0.0
    for upper, cumulative in pairs:
        if cumulative >= rank:
            if math.isinf(upper):
                return lower
            return lower + (upper - lower) * (rank - below) / (cumulative - below)
        lower, below = upper, cumulative
    return lower


def read(metric: MetricWrapperBase) -> Values:
    """Every sample of `metric` now, keyed by the suffix of its name (`_total`, `_bucket`,
    `_sum`, `_count`, or "" for a gauge) and its label values; `_created` left out."""
    values: Values = {}
    for family in metric.collect():
        for s in family.samples:
            suffix = s.name[len(family.name) :]
            if suffix != "_created":
                values[(suffix, *s.labels.values())] = s.value
    return values


def _increase(new: Values, old: Values) -> Values:
    """Per series growth; a series that went down was reset (or re-created), so it grew by
    its whole new value, as PromQL's `increase` counts it."""
    grown: Values = {}
    for key, value in new.items():
        before = old.get(key, 0.0)
        grown[key] = value - before if value >= before else value
    return grown


def _ratio(part: float, whole: float) -> float | None:
    return round(part / whole, 6) if whole > 0 else None


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 3)


class Sampler:
    """Samples `metrics` every `interval_s` into a ring buffer of `window` samples.

    `batch_limits` gives each served (model, version)'s `max_batch_size`, for batch fill;
    `refresh` runs before each reading (the app passes the registry's breaker check, so an
    open breaker past its cooldown shows as half-open). Tests call `sample()` directly with
    an injected `clock`; the app calls `start()` and `aclose()` in its lifespan.
    """

    def __init__(
        self,
        metrics: Metrics,
        *,
        batch_limits: BatchLimits = dict,
        refresh: Callable[[], object] | None = None,
        clock: Callable[[], float] = time.monotonic,
        interval_s: float = 1.0,
        window: int = 300,
        now_window: int = 60,
    ) -> None:
        self.metrics = metrics
        self.batch_limits = batch_limits
        self.refresh = refresh
        self.clock = clock
        self.interval_s = interval_s
        self.window = window
        self.boot = uuid.uuid4().hex[:16]  # tells a page that this is a new timeline
        self.samples: deque[Sample] = deque(maxlen=window)
        self.now: Sample | None = None  # over the last `now_window` intervals (a minute)
        self._readings: deque[_Reading] = deque(maxlen=now_window + 1)
        self._started = clock()
        self._periodic = Periodic("dashboard-sampler", interval_s, self._step)
        m = metrics
        self._counters = {
            "requests": m.requests,
            "latency": m.latency,
            "batches": m.batch_size,
            "cache": m.cache_requests,
            "shed": m.shed,
            "loads": m.model_loads,
            "evictions": m.model_evictions,
        }
        self._gauges = {
            "inflight": m.inflight,
            "models": m.models_loaded,
            "breakers": m.circuit_state,
            "queue": m.queue_rows,
            "resident": m.resident_bytes,
            "memory": m.memory_resident,
            "budget": m.memory_budget,
        }

    def sample(self) -> Sample | None:
        """Read the metrics now and record the interval since the last reading (the first
        call only takes the baseline and returns None)."""
        if self.refresh is not None:
            self.refresh()
        reading = _Reading(
            self.clock(),
            {role: read(metric) for role, metric in self._counters.items()},
            {role: read(metric) for role, metric in self._gauges.items()},
        )
        previous = self._readings[-1] if self._readings else None
        self._readings.append(reading)
        if previous is None:
            return None
        sample = self._between(previous, reading)
        self.samples.append(sample)
        self.now = self._between(self._readings[0], reading)
        return sample

    def since(self, t: float | None = None) -> list[Sample]:
        """The samples taken after `t` (all of them when `t` is None)."""
        if t is None:
            return list(self.samples)
        return [s for s in self.samples if s.t > t]

    def _between(self, old: _Reading, new: _Reading) -> Sample:
        dt = max(new.at - old.at, 1e-9)
        grown = {role: _increase(new.counters[role], old.counters[role]) for role in new.counters}

        classes = dict.fromkeys(STATUS_CLASSES, 0.0)
        for (_, _model, status), value in grown["requests"].items():
            status_class = status if status == "429" else f"{status[:1]}xx"
            classes[status_class] = classes.get(status_class, 0.0) + value
        answered = sum(classes.values())

        buckets: dict[float, float] = {}
        for (_, _model, le), value in _only(grown["latency"], "_bucket"):
            buckets[float(le)] = buckets.get(float(le), 0.0) + value
        ordered = sorted(buckets.items())
        p50, p95, p99 = (_ms(quantile(q, ordered)) for q in QUANTILES)

        limits = self.batch_limits()
        forwards = sum(v for _, v in _only(grown["batches"], "_count"))
        fill = sum(
            rows / max(limits.get((model, version), 1), 1)
            for (_, model, version), rows in _only(grown["batches"], "_sum")
        )
        cache = {"hit": 0.0, "miss": 0.0}
        for (_, _model, result), value in grown["cache"].items():
            cache[result] = cache.get(result, 0.0) + value

        loads = {"ok": 0.0, "failed": 0.0}
        for (_, _model, _reason, result), value in _only(grown["loads"], "_total"):
            loads[result] = loads.get(result, 0.0) + value
        gauges = new.gauges
        budgets = gauges["budget"].values()
        return Sample(
            t=round(new.at - self._started, 3),
            interval_s=round(dt, 3),
            rps=round(answered / dt, 3),
            error_rate=_ratio(classes["5xx"], answered),
            refused_rate=_ratio(classes["4xx"], answered),
            limited_rate=_ratio(classes["429"], answered),
            status={k: round(v / dt, 3) for k, v in classes.items()},
            counts={k: round(v) for k, v in classes.items()},
            p50_ms=p50,
            p95_ms=p95,
            p99_ms=p99,
            inflight=sum(gauges["inflight"].values()),
            models_loaded=sum(gauges["models"].values()),
            breakers={
                f"{model}/{version}": _breaker_state(value)
                for (_, model, version), value in sorted(gauges["breakers"].items())
            },
            queue_rows=sum(gauges["queue"].values()),
            batch_fill=_ratio(fill, forwards),
            forwards_per_s=round(forwards / dt, 3),
            cache_hit_rate=_ratio(cache["hit"], cache["hit"] + cache["miss"]),
            shed_per_s=round(sum(grown["shed"].values()) / dt, 3),
            resident={
                f"{model}/{version}": value
                for (_, model, version), value in sorted(gauges["resident"].items())
            },
            memory_bytes=sum(gauges["memory"].values()),
            memory_budget_bytes=sum(budgets) if budgets else None,
            loads=round(loads["ok"]),
            load_failures=round(loads["failed"]),
            evictions=round(sum(v for _, v in _only(grown["evictions"], "_total"))),
        )

    # the background task ---------------------------------------------------------------

    def start(self) -> None:
        """Sample every `interval_s` on the running loop until `aclose()`."""
        self.sample()
        self._periodic.start()

    async def aclose(self) -> None:
        await self._periodic.aclose()

    async def _step(self) -> None:
        self.sample()


def _only(values: Values, suffix: str) -> list[tuple[Series, float]]:
    return [(key, value) for key, value in values.items() if key[0] == suffix]


def _breaker_state(value: float) -> str:
    try:
        return BreakerState(int(value)).name.lower()
    except ValueError:
        return "unknown"

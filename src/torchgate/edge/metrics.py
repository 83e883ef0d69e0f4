"""Request metrics: in-flight gauge, per-route HTTP counts, and the article's per-model
series for the routes whose policy is `INFER`."""

from __future__ import annotations

import time
from typing import Any

from starlette.types import ASGIApp, Receive, Scope, Send

from torchgate.api.routes import Policy
from torchgate.metrics import UNKNOWN, Metrics


class MetricsMiddleware:
    """Counts every HTTP request by route template; inference requests also by model.

    The model label comes from the request context, which handlers fill in only once the
    model is known to be loaded, so a hostile URL can never mint a new label value."""

    def __init__(self, app: ASGIApp, *, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics
        # label children by metric and label values: `labels()` takes a lock and hashes
        # its arguments on every call. Bounded as the series are: routes, methods, codes,
        # models.
        self._children: dict[tuple[Any, ...], Any] = {}
        # requests in flight: a plain count, read at scrape time (no lock per request)
        self._inflight = 0
        metrics.inflight.set_function(lambda: self._inflight)

    def _child(self, metric: Any, *values: str) -> Any:
        key = (metric, *values)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*values)
        return child

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        m = self.metrics
        ctx = scope["torchgate"]
        self._inflight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self._inflight -= 1
            route = ctx.route
            code = str(ctx.status)
            template = route.template if route is not None else "unmatched"
            self._child(m.http_requests, template, scope["method"], code).inc()
            if route is not None and route.policy is Policy.INFER and scope["method"] == "POST":
                model = ctx.model or UNKNOWN
                self._child(m.requests, model, code).inc()
                took = time.perf_counter() - ctx.started
                self._child(m.latency, model).observe(took)
                if not 200 <= ctx.status < 300:
                    self._child(m.error_latency, model).observe(took)

"""Request metrics: in-flight gauge, per-route HTTP counts, and the article's per-model series."""

from __future__ import annotations

import time
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from torchgate.metrics import UNKNOWN, Metrics

INFERENCE_ROUTES = ("/predict", "/v1/models/", "/v2/models/", "/v1/embeddings")


class MetricsMiddleware:
    """Counts every HTTP request by route template; inference requests also by model.

    The model label comes from `scope["state"]["model"]`, which handlers set only once the
    model is known to be loaded, so a hostile URL can never mint a new label value.
    """

    def __init__(self, app: ASGIApp, *, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics
        # label children by metric and label values: `labels()` takes a lock and hashes
        # its arguments on every call. Bounded as the series are: routes, methods, codes,
        # models.
        self._children: dict[tuple[Any, ...], Any] = {}

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
        started = time.perf_counter()
        status = 500

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        m.inflight.inc()
        try:
            await self.app(scope, receive, send_status)
        finally:
            m.inflight.dec()
            template = (
                scope.get("route_template")  # set by api.hot for the inference routes
                or getattr(scope.get("route"), "path", None)
                or "unmatched"
            )
            code = str(status)
            self._child(m.http_requests, template, scope["method"], code).inc()
            path = scope["path"]
            if (
                scope["method"] == "POST"
                and path.startswith(INFERENCE_ROUTES)
                and (
                    path in ("/predict", "/v1/embeddings") or path.endswith((":predict", "/infer"))
                )
            ):
                model = scope.get("state", {}).get("model", UNKNOWN)
                self._child(m.requests, model, code).inc()
                self._child(m.latency, model).observe(time.perf_counter() - started)

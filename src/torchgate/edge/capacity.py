"""The server's own bound on requests in flight: past `max_inflight` (probes and metrics
aside) a request is answered 503 at once, before auth, limits or its body: the last line
of defence when every model's admission (`serving.concurrency`) still lets too much in,
well below what uvicorn would accept."""

from __future__ import annotations

from starlette.types import ASGIApp, Receive, Scope, Send

from torchgate.api.routes import Policy
from torchgate.edge.responses import send_error
from torchgate.metrics import Metrics

_EXEMPT = (Policy.PROBE, Policy.OBSERVABILITY)


class CapacityMiddleware:
    def __init__(self, app: ASGIApp, *, max_inflight: int, metrics: Metrics) -> None:
        self.app = app
        self.max_inflight = max_inflight
        self.metrics = metrics
        self.inflight = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        route = scope["torchgate"].route
        if route is not None and route.policy in _EXEMPT:
            await self.app(scope, receive, send)
            return
        if self.inflight >= self.max_inflight:
            self.metrics.refused.labels("server_full").inc()
            await send_error(
                send,
                503,
                f"the server is at its limit of {self.max_inflight} requests in flight",
                {"Retry-After": "1"},
            )
            return
        self.inflight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.inflight -= 1

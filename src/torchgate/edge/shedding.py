"""`Shedder`: which requests to refuse before they become requests at all.

Called by the HTTP protocol (`protocol.py`) with a request's method and path as soon as
its head is parsed: when the route is an inference route and its model's default
version has no room left (its admission limit, `serving.concurrency`, is reached), the
answer is a canned 503 with a Retry-After spread over the drain time, written at once.
Such a refusal costs the event loop a route match and a lookup, where one refused by the
handler pays for a task, the whole edge and the access log: under a flood, the loop's
time goes to the requests it can serve. Everything else goes on as usual (and is refused,
if it must be, by the handler's admission, which also sees canaries and versions).
"""

from __future__ import annotations

from typing import Any

import orjson

from torchgate.api.routes import Policy, RouteTable
from torchgate.errors import ModelNotFound
from torchgate.metrics import Metrics


class Shedder:
    def __init__(self, routes: RouteTable, metrics: Metrics) -> None:
        self.routes = routes
        self.metrics = metrics
        self.registry: Any = None  # set once the lifespan has loaded the models
        self._children: dict[str, tuple[Any, Any]] = {}

    def __call__(self, method: str, path: str) -> bytes | None:
        registry = self.registry
        if registry is None or method != "POST":
            return None
        found = self.routes.match(method, path)
        route = found.route
        if route is None or route.policy is not Policy.INFER:
            return None
        name = found.params.get("name")
        try:
            served = registry.resolve(name or registry.default_model(), found.params.get("version"))
        except ModelNotFound:
            return None
        limit = served.limit
        if limit.inflight < int(limit.limit):
            return None
        return self._refusal(served.name, limit.retry_after_s(), int(limit.limit))

    def _refusal(self, model: str, retry_after_s: float, limit: int) -> bytes:
        children = self._children.get(model)
        if children is None:
            m = self.metrics
            children = self._children[model] = (
                m.shed.labels(model, "overloaded"),
                m.requests.labels(model, "503"),
            )
        for child in children:
            child.inc()
        body = orjson.dumps(
            {
                "error": f"model {model} is overloaded: it is serving all the requests it "
                f"can ({limit} at once); retry later"
            }
        )
        return (
            b"HTTP/1.1 503 Service Unavailable\r\n"
            b"content-type: application/json\r\n"
            b"retry-after: %d\r\n"
            b"content-length: %d\r\n\r\n" % (max(1, round(retry_after_s)), len(body))
        ) + body

"""Probes and metrics: liveness, readiness (with reasons), and the Prometheus text."""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.requests import Request
from starlette.responses import Response

from torchgate.api.routes import Policy, route
from torchgate.edge.responses import Answer, json_answer


def readiness_problems(request: Request) -> list[str]:
    """Why this replica should not get traffic now; empty when it should. About the pod
    only: a model whose circuit is open is unavailable on its own (its model readiness and
    its requests say so), never a reason to take every other model down with the pod."""
    state = request.app.state
    problems: list[str] = []
    if not getattr(state, "ready", False):
        problems.append("models are not loaded yet")
    if getattr(state, "draining", False):
        problems.append("draining")
    registry = getattr(state, "registry", None)
    if registry is not None:  # pinned and start-up models loaded (serving.residency)
        problems += registry.residency.unready()
    return problems


async def health(request: Request) -> Answer:
    """Liveness: the process is up and its event loop answers."""
    return json_answer({"status": "ok"})


async def ready(request: Request) -> Answer:
    """Readiness: models loaded and warmed, not draining."""
    problems = readiness_problems(request)
    if problems:
        return json_answer({"status": "not ready", "reasons": problems}, 503)
    return json_answer({"status": "ready"})


async def metrics(request: Request) -> Response:
    """The Prometheus text of this server's metrics."""
    registry = getattr(request.app.state, "registry", None)
    if registry is not None:
        registry.open_circuits()  # an open breaker past its cooldown shows as half-open
    text = generate_latest(request.app.state.metrics.registry)
    return Response(text, media_type=CONTENT_TYPE_LATEST)


ROUTES = [
    route("/health", "GET", Policy.PROBE, health),
    route("/health/ready", "GET", Policy.PROBE, ready),
    route("/metrics", "GET", Policy.OBSERVABILITY, metrics),
]

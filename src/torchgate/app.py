"""`create_app(settings)`: builds a whole torchgate app; the lifespan loads and serves models."""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import torch
from fastapi import FastAPI
from prometheus_client import CollectorRegistry
from starlette.middleware import Middleware
from starlette.types import ASGIApp

from torchgate import __version__, memory
from torchgate.api import admin, dashboard, health, openai, v1, v2, v2_repository
from torchgate.api.routes import RouteTable
from torchgate.api.textguard import TextPolicy
from torchgate.config import Settings
from torchgate.edge.auth import AuthMiddleware
from torchgate.edge.body import BodyLimitMiddleware
from torchgate.edge.capacity import CapacityMiddleware
from torchgate.edge.context import RequestContextMiddleware
from torchgate.edge.dispatch import Dispatcher
from torchgate.edge.limiter import RateLimiter
from torchgate.edge.limits import RateLimitMiddleware
from torchgate.edge.metrics import MetricsMiddleware
from torchgate.edge.shedding import Shedder
from torchgate.keys import KeyStore
from torchgate.lifecycle.drift import DriftScorer
from torchgate.lifecycle.rollout_state import RolloutState, open_store
from torchgate.metrics import Metrics
from torchgate.periodic import Periodic
from torchgate.process import ProcessTuning
from torchgate.sampler import Sampler
from torchgate.serving.admission import Admission, admit_all
from torchgate.serving.cache import InferenceCache
from torchgate.serving.registry import ModelRegistry
from torchgate.serving.repository import ModelRepository
from torchgate.serving.service import InferenceService

log = logging.getLogger("torchgate")


# FastAPI 0.16x checks OpenTelemetry providers on every request unless told not to; torchgate
# has its own Prometheus metrics and JSON logs (with W3C trace ids), so it opts out.
_NO_NATIVE_TELEMETRY: dict[str, object] = (
    {"telemetry": {"tracing": False, "metrics": False, "logs": False}}
    if "telemetry" in inspect.signature(FastAPI.__init__).parameters
    else {}
)


def create_app(
    settings: Settings,
    *,
    models: dict[str, Admission] | None = None,
    keys: KeyStore | None = None,
) -> FastAPI:
    """A torchgate app for `settings`. `models` are models already through the gate (the
    CLI admits them first so a broken repository fails before the server starts);
    otherwise the lifespan loads the repository and holds it to the gate. `keys`: the keys
    file as the CLI read it already; otherwise it is read here (with auth on)."""
    metrics = Metrics(CollectorRegistry(), version=__version__)
    auth_on = settings.auth == "on"
    if not auth_on:
        keys = None
    elif keys is None:
        keys = KeyStore.load(settings.api_keys_file, settings.plain_api_keys())
    limiter = (
        None
        if settings.rate_limit == "off"
        else RateLimiter(settings.rate_limit, redis_url=settings.redis_url, metrics=metrics)
    )

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        tuning = ProcessTuning(settings)  # torch threads, switch interval, GC (process.py)
        tuning.apply()
        repository = ModelRepository(
            settings.models, settings.device, max_tokens=settings.max_tokens
        )
        cache = InferenceCache(
            metrics, redis_url=settings.redis_url, ttl_override_s=settings.cache_ttl_s
        )
        rollouts = RolloutState(open_store(repository.root, settings.redis_url))
        registry = ModelRegistry(repository, settings, metrics, cache, rollouts)
        admitted = models
        if admitted is None:
            admitted = await asyncio.to_thread(admit_all, repository, rollouts.read)
        # popped: from here the registry alone holds the models, so that a version it
        # unloads is freed
        for name in list(admitted):
            registry.install(admitted.pop(name))
        registry.start()
        app.state.registry = registry
        app.shed.registry = registry
        app.state.service = InferenceService(registry, metrics, draining=lambda: app.state.draining)
        sampler = Sampler(
            metrics,
            batch_limits=lambda: {
                (v.name, str(v.version)): v.config.max_batch_size for v in registry.versions()
            },
            refresh=registry.open_circuits,
        )
        sampler.start()
        app.state.sampler = sampler
        drift_scorer = DriftScorer(registry.drift_monitors)
        drift_scorer.start()

        async def trim_step() -> None:
            memory.trim()

        trimming = Periodic("memory-trim", memory.TRIM_EVERY_S, trim_step)
        trimming.start()
        tuning.settle()  # freeze start-up objects out of the collector (memory.py)
        app.state.ready = True
        if not auth_on:
            log.warning("authentication is OFF: anyone who can reach this port can use it")
        log.info(
            "serving",
            extra={
                "models": registry.names(),
                "versions": len(registry.versions()),
                "torch_threads": torch.get_num_threads(),
            },
        )
        try:
            yield
        finally:
            await sampler.aclose()
            await drift_scorer.aclose()
            await trimming.aclose()
            app.state.ready = False
            app.state.draining = True
            drained = await registry.drain(settings.drain_timeout_s)
            await registry.aclose()
            await cache.aclose()
            if limiter is not None:
                await limiter.aclose()
            tuning.restore()
            log.info("stopped", extra={"drained": drained})

    app = TorchgateApp(
        title="torchgate",
        version=__version__,
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
        **_NO_NATIVE_TELEMETRY,
    )
    app.state.settings = settings
    app.state.metrics = metrics
    app.state.limiter = limiter
    app.state.ready = False
    app.state.draining = False
    app.state.text_policy = TextPolicy(
        max_length=settings.max_text_length, deny_phrases=settings.deny_list()
    )
    routes = RouteTable(ROUTES)
    app.routes_table = routes
    app.shed = Shedder(routes, metrics)  # asked by the HTTP protocol (protocol.py)
    # Outermost first: request context (and the route match), metrics, the server's bound
    # on requests in flight, auth, rate limit, body limits (DESIGN.md), then the dispatcher
    # that calls the route's handler.
    edge: list[Middleware] = [Middleware(RequestContextMiddleware, routes=routes)]
    edge.append(Middleware(MetricsMiddleware, metrics=metrics))
    edge.append(Middleware(CapacityMiddleware, max_inflight=settings.max_inflight, metrics=metrics))
    if keys is not None:
        edge.append(
            Middleware(AuthMiddleware, keys=keys, metrics_open=not settings.metrics_require_key)
        )
    if limiter is not None:
        edge.append(Middleware(RateLimitMiddleware, limiter=limiter))
    edge.append(
        Middleware(
            BodyLimitMiddleware,
            max_bytes=settings.max_body_bytes,
            timeout_s=settings.body_timeout_s,
            metrics=metrics,
        )
    )
    app.edge = tuple(edge)
    return app


# Every route torchgate answers, each with its policy (api/routes.py)
ROUTES = [
    *health.ROUTES,
    *v1.ROUTES,
    *v2.ROUTES,
    *openai.ROUTES,
    *dashboard.ROUTES,
    *v2_repository.ROUTES,
    *admin.ROUTES,
]


class TorchgateApp(FastAPI):
    """FastAPI as torchgate's shell (the lifespan, `app.state`, `add_middleware`), with
    torchgate's edge in front: every HTTP request passes the edge (`edge`) and the
    dispatcher, which calls the matched route's handler from the route table; FastAPI's
    own router sees only the lifespan. `RequestContextMiddleware` answers an exception
    that escapes with a JSON 500.
    Middleware added with `app.add_middleware()` goes outside the edge: it sees every
    request, the inference routes included."""

    edge: tuple[Middleware, ...] = ()
    routes_table: RouteTable | None = None
    shed: Shedder | None = None

    def build_middleware_stack(self) -> ASGIApp:
        if self.routes_table is not None:
            self.routes_table.check(self)  # a route without a policy is refused
        added, self.user_middleware = self.user_middleware, []
        try:
            inner = super().build_middleware_stack()
        finally:
            self.user_middleware = added
        stack: ASGIApp = Dispatcher(inner)
        for cls, args, kwargs in reversed([*added, *self.edge]):
            stack = cls(stack, *args, **kwargs)
        return stack

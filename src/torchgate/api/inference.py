"""The body every inference route shares, whatever its protocol: resolve the model, run
the decoded request through the service, and note what the access log and metrics need.

The inference routes are served by `api.hot.HotRoutes`, not by FastAPI's router: its
dependency injection, validation and exception machinery cost more than these routes do
(an empty handler: 6.3k requests/s as a FastAPI route, 11.6k as a Starlette one, 22.6k as
plain ASGI, on this project's machine); they take raw bytes and return raw bytes anyway.
"""

from __future__ import annotations

import numpy as np
from starlette.requests import Request

from torchgate.api.textguard import TextPolicy
from torchgate.serving.registry import ModelRegistry, ServedVersion
from torchgate.serving.service import InferenceResult, InferenceService


def registry_of(request: Request) -> ModelRegistry:
    return request.app.state.registry


def caller(request: Request) -> str:
    """Who is asking, for a sticky canary split: the API key's name, else the address."""
    key_name = request.scope.get("state", {}).get("key_name")
    if key_name:
        return key_name
    client = request.client
    return client.host if client else ""


def resolve(request: Request, name: str | None, version: str | None) -> ServedVersion:
    """The served version a request is for (a canary's, for some callers, when it names
    none); the model becomes a metrics label only now."""
    registry = registry_of(request)
    identity = "" if version else caller(request)
    served, canary = registry.route(name or registry.default_model(), version, identity)
    state = request.state
    state.model, state.version, state.canary = served.name, served.version, canary
    return served


async def run(
    request: Request, served: ServedVersion, inputs: list[np.ndarray], rows: int
) -> InferenceResult:
    service: InferenceService = request.app.state.service
    policy: TextPolicy = request.app.state.text_policy
    for spec, array in zip(served.config.inputs, inputs, strict=True):
        if spec.datatype == "BYTES":
            policy.check(array, f"input {spec.name!r}")
    state = request.state
    state.rows = rows
    result = await service.infer(
        served,
        inputs,
        rows,
        receive=request.receive,
        cache_control=request.headers.get("cache-control"),
        canary=getattr(state, "canary", None),
    )
    state.cache = result.cache
    state.queue_ms = round(result.queue_s * 1000, 3)
    state.compute_ms = round(result.compute_s * 1000, 3)
    return result


def cache_header(result: InferenceResult) -> dict[str, str]:
    return {"X-Cache": result.cache} if result.cache else {}

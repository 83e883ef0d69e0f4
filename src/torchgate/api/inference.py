"""The body every inference route shares, whatever its protocol: resolve the model, run
the decoded request through the service, and note what the access log and metrics need.

The inference routes are served by `api.hot.HotRoutes`, not by FastAPI's router: its
dependency injection, validation and exception machinery cost more than these routes do
(an empty handler: 6.3k requests/s as a FastAPI route, 11.6k as a Starlette one, 22.6k as
plain ASGI, on this project's machine); they take raw bytes and return raw bytes anyway.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TypeVar

import numpy as np
from starlette.requests import Request

from torchgate.api.textguard import TextPolicy
from torchgate.errors import BadRequest
from torchgate.metrics import Metrics
from torchgate.processors.config import ImagePreprocess
from torchgate.serving.model_config import TensorSpec
from torchgate.serving.registry import ModelRegistry, ServedVersion
from torchgate.serving.service import InferenceResult, InferenceService

T = TypeVar("T")

# A body this large is decoded in a thread: parsing it and checking its elements (JSON
# numbers, BYTES strings, text policy) would hold the event loop for milliseconds, and a
# 10 MiB body for a second or more. Smaller bodies decode inline, where a thread hand-off
# would cost more than the decoding itself.
OFFLOAD_BYTES = 64 * 1024


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


async def decode(body: bytes, decoder: Callable[[], T]) -> T:
    """Run a codec's `decoder` for `body`: inline when it is small, in a thread when not."""
    if len(body) < OFFLOAD_BYTES:
        return decoder()
    return await asyncio.to_thread(decoder)


def screen_text(
    request: Request,
    served: ServedVersion,
    inputs: list[np.ndarray],
    specs: tuple[TensorSpec, ...],
    processed: bool = False,
) -> None:
    """Refuse text inputs the text policy does not allow (part of decoding: it runs off the
    event loop with the rest when the body is large). `specs`: what `inputs` were decoded
    as; `processed`: they are the preprocessor's (encoded images are not text)."""
    config = served.config
    if processed and isinstance(config.preprocess, ImagePreprocess):
        return
    policy: TextPolicy = request.app.state.text_policy
    for spec, array in zip(specs, inputs, strict=True):
        if spec.datatype == "BYTES":
            try:
                policy.check(array, f"input {spec.name!r}")
            except BadRequest:
                if config.preprocess is not None:
                    metrics: Metrics = request.app.state.metrics
                    metrics.preprocess_refusals.labels(served.name, "text_policy").inc()
                raise


async def run(
    request: Request,
    served: ServedVersion,
    inputs: list[np.ndarray],
    rows: int,
    material: list[bytes] | None = None,
) -> InferenceResult:
    """Run decoded inputs through the service; `material`: what a preprocessor made each
    row from (the cache keys rows by it)."""
    service: InferenceService = request.app.state.service
    state = request.state
    state.rows = rows
    key_name = getattr(state, "key_name", None)
    # a cache scoped per key keeps each key's answers (and what it asked) to itself; a
    # shared one must not say HIT to key B for what key A sent
    per_key = served.config.cache.scope == "key"
    result = await service.infer(
        served,
        inputs,
        rows,
        receive=request.receive,
        cache_control=request.headers.get("cache-control"),
        canary=getattr(state, "canary", None),
        caller=caller(request),
        tenant=key_name if per_key and key_name else "",
        material=material,
    )
    state.cache = result.cache
    state.cache_visible = per_key or not key_name
    state.queue_ms = round(result.queue_s * 1000, 3)
    state.compute_ms = round(result.compute_s * 1000, 3)
    return result


def cache_header(request: Request, result: InferenceResult) -> dict[str, str]:
    """`X-Cache`, unless it would tell one key what another asked (a shared cache)."""
    if result.cache and request.state.cache_visible:
        return {"X-Cache": result.cache}
    return {}

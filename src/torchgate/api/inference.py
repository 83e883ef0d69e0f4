"""The body every inference route shares, whatever its protocol: resolve the model, run
the decoded request through the service, and note in the request context what the access
log and metrics need.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

import numpy as np
from starlette.requests import Request
from starlette.types import Receive

from torchgate.api.textguard import TextPolicy
from torchgate.edge.context import context, header
from torchgate.errors import BadRequest, DeadlineExceeded, InferenceFailed, Overloaded
from torchgate.metrics import Metrics
from torchgate.processors.config import ImagePreprocess
from torchgate.serving.cache import CachePolicy
from torchgate.serving.model_config import TensorSpec
from torchgate.serving.registry import ModelRegistry
from torchgate.serving.served import ServedVersion
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
    key = context(request).key
    if key is not None:
        return key.name
    client = request.scope.get("client")
    return client[0] if client else ""


async def resolve(
    request: Request, name: str | None = None, version: str | None = None
) -> ServedVersion:
    """The served version a request is for (the route's `name` and `version` unless given;
    a canary's, for some callers, when it names none), its model loaded first if it is
    not (`residency`) and held for this request; the model becomes a metrics label only
    now."""
    ctx = context(request)
    params = ctx.params
    name = name or params.get("name")
    version = version or params.get("version")
    registry = registry_of(request)
    identity = "" if version else caller(request)
    name = name or registry.default_model()
    await registry.residency.acquire(name)
    served, canary = registry.route(name, version, identity)
    ctx.model, ctx.version, ctx.canary = served.name, served.version, canary
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
    ctx = context(request)
    ctx.rows = rows
    deadline = ctx.arrived + served.batcher.options.timeout_s  # counted from its arrival
    if time.monotonic() >= deadline:
        raise DeadlineExceeded(
            f"the request's deadline passed before it reached {served.model.key}: it was not "
            f"answered within {served.batcher.options.timeout_s * 1000:.0f} ms of its arrival"
        )
    key_name = ctx.key_name
    # a cache scoped per key keeps each key's answers (and what it asked) to itself; a
    # shared one must not say HIT to key B for what key A sent
    per_key = served.config.cache.scope == "key"
    result = await service.infer(
        served,
        inputs,
        rows,
        disconnected=_disconnect(request.receive),
        cache_policy=CachePolicy.from_header(header(request.scope, b"cache-control")),
        canary=ctx.canary,
        caller=caller(request),
        tenant=key_name if per_key and key_name else "",
        material=material,
        deadline=deadline,
    )
    ctx.cache = result.cache
    ctx.cache_visible = per_key or not key_name
    ctx.queue_ms = round(result.queue_s * 1000, 3)
    ctx.compute_ms = round(result.compute_s * 1000, 3)
    return result


class admitted:  # noqa: N801 - used as `with inference.admitted(...)`
    """A request's place among its version's requests in flight, taken before its body is
    read: past the version's limit it is refused at once with 503 (`Overloaded`), before
    anything is decoded. Given back when the request is answered, with its latency."""

    __slots__ = ("_limit", "_started")

    def __init__(self, request: Request, served: ServedVersion) -> None:
        limit = served.limit
        if not limit.try_acquire():
            metrics: Metrics = request.app.state.metrics
            metrics.shed.labels(served.name, "overloaded").inc()
            raise Overloaded(
                f"model {served.name} is overloaded: it is serving all the requests it can "
                f"({int(limit.limit)} at once); retry later",
                retry_after_s=limit.retry_after_s(),
            )
        self._limit = limit
        self._started = time.monotonic()

    def __enter__(self) -> admitted:
        return self

    def __exit__(self, kind: type[BaseException] | None, *rest: object) -> None:
        # only answers that went through the model tell how fast it answers
        counted = kind is None or issubclass(kind, InferenceFailed | DeadlineExceeded)
        self._limit.release(time.monotonic() - self._started, counted)


def _disconnect(receive: Receive) -> Callable[[], Awaitable[None]]:
    """What returns once the client has gone (the body is read: the next ASGI message on
    this request is the disconnect)."""

    async def disconnected() -> None:
        while (await receive())["type"] != "http.disconnect":
            pass

    return disconnected


_X_CACHE = {v: (b"x-cache", v.encode()) for v in ("HIT", "MISS", "PARTIAL")}


def cache_header(request: Request, result: InferenceResult) -> list[tuple[bytes, bytes]]:
    """`X-Cache`, unless it would tell one key what another asked (a shared cache)."""
    if result.cache and context(request).cache_visible:
        return [_X_CACHE[result.cache]]
    return []

"""Requests for a model with a preprocessor: images and texts in, model inputs out.

A row is one encoded image or one text. V1 carries them as `{"instances": [...]}` (a
string per text; `{"b64": "..."}` or a base64 string per image, the TF Serving / KServe
V1 convention) or as a raw `image/jpeg|png|webp` body holding one image; V2 as a BYTES
tensor of shape [rows, 1] (raw bytes with the binary extension, base64 text in JSON).
Texts pass the text policy first; then the model's processor runs, on the version's
preprocess thread when its work is long (every image, any long text), timed and its
refusals counted by reason.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
from starlette.requests import Request

from torchgate.api.codec import check_rows
from torchgate.edge.context import context
from torchgate.edge.limiter import RateLimiter
from torchgate.errors import BadRequest, RateLimited
from torchgate.metrics import Metrics
from torchgate.processors.config import ImagePreprocess
from torchgate.processors.prepared import InputRefused, Prepared
from torchgate.serving.model_config import ModelConfig
from torchgate.serving.served import ServedVersion


def v1_wants_processor(payload: Any, config: ModelConfig) -> bool:
    """Whether V1 instances are images or texts (strings, `{"b64": ...}`) rather than the
    model's tensors, for a model with a preprocessor."""
    if config.preprocess is None or not isinstance(payload, dict):
        return False
    instances = payload.get("instances")
    if not isinstance(instances, list) or not instances:
        return False  # the tensor path's messages explain the envelope
    first = instances[0]
    return isinstance(first, str) or (isinstance(first, dict) and "b64" in first)


def v2_wants_processor(payload: Any, config: ModelConfig) -> bool:
    """Whether a V2 request carries the preprocessor's input rather than the model's."""
    if config.preprocess is None or not isinstance(payload, dict):
        return False
    inputs = payload.get("inputs")
    name = config.preprocess.name
    return isinstance(inputs, list) and any(
        isinstance(t, dict) and t.get("name") == name for t in inputs
    )


def v1_items(payload: Any, config: ModelConfig) -> list[object]:
    """`{"instances": [...]}` as one item per row."""
    if not isinstance(payload, dict) or not isinstance(payload.get("instances"), list):
        kind = "image" if isinstance(config.preprocess, ImagePreprocess) else "text"
        example = '{"b64": "..."}' if kind == "image" else '"a text"'
        raise BadRequest(f'expected a JSON object {{"instances": [{example}, ...]}}')
    instances = payload["instances"]
    check_rows(len(instances), config)
    image = isinstance(config.preprocess, ImagePreprocess)
    items: list[object] = []
    for i, item in enumerate(instances):
        if image and isinstance(item, dict) and set(item) == {"b64"}:
            item = item["b64"]
        if not isinstance(item, str):
            shape = 'a {"b64": "..."} object or a base64 string' if image else "a string"
            raise BadRequest(f"row {i}: expected {shape}")
        items.append(item)
    return items


def v2_items(array: np.ndarray) -> list[object]:
    """A decoded BYTES tensor of shape [rows, 1] as one item per row."""
    return list(array.reshape(-1))


async def prepare(request: Request, served: ServedVersion, items: list[object]) -> Prepared:
    """The model inputs for `items`, through the model's preprocessor."""
    pre = served.model.preprocessor
    assert pre is not None
    metrics: Metrics = request.app.state.metrics
    started = time.perf_counter()
    try:
        if served.preprocess is not None and pre.offload(items):
            prepared = await served.preprocess.run(pre.prepare, items)
        else:
            prepared = pre.prepare(items)
    except InputRefused as exc:
        metrics.preprocess_refusals.labels(served.name, exc.reason).inc()
        raise
    elapsed = time.perf_counter() - started
    metrics.preprocess.labels(served.name).observe(elapsed)
    ctx = context(request)
    ctx.preprocess_ms = round(elapsed * 1000, 3)
    ctx.tokens = prepared.tokens or None
    await spend_tokens(request, prepared.tokens)
    return prepared


async def spend_tokens(request: Request, tokens: int) -> None:
    """A key with `tokens_per_minute` spends a text request's tokens, or gets 429."""
    key = context(request).key
    per_minute = None if key is None else key.tokens_per_minute
    limiter: RateLimiter | None = request.app.state.limiter
    if not tokens or key is None or per_minute is None or limiter is None:
        return
    spec = f"{per_minute}/minute"
    decision = await limiter.hit(f"tokens:{key.name}", spec, cost=tokens)
    if not decision.allowed:
        limiter.metrics.ratelimit_rejections.labels("tokens").inc()
        raise RateLimited(
            f"{tokens} tokens would pass this key's limit of {per_minute} tokens per minute",
            headers={"Retry-After": str(decision.reset_s)},
        )

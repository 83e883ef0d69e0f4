"""`POST /v1/embeddings`: OpenAI's embeddings API over torchgate's text models, so that the
`openai` client and the libraries built on it (LangChain, LlamaIndex) work unchanged.

A request names a model served with `[preprocess] kind = "text"` and gives `input`: a
string, a list of strings, or token ids (a list of integers, or a list of such lists).
The texts go the way of every text request (text policy, tokenizer, cache per text, the
batcher packing rows by tokens); the answer is OpenAI's list of embeddings, as floats or
base64 (little-endian float32), with the tokens used. Errors on this route are in
OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`, with the status codes
of the rest of torchgate.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson
from starlette.requests import Request

from torchgate.api import inference, prepare
from torchgate.api.body import read_body
from torchgate.api.codec import parse_json
from torchgate.api.routes import Policy, route
from torchgate.edge.context import context
from torchgate.edge.responses import Answer, json_answer
from torchgate.errors import BadRequest, ModelNotFound, TorchgateError
from torchgate.processors.prepared import InputRefused
from torchgate.processors.text import TextProcessor
from torchgate.serving.served import ServedVersion

MAX_INPUTS = 2048  # texts in one request, as OpenAI's API allows
_TYPES = {401: "invalid_request_error", 404: "invalid_request_error", 429: "rate_limit_error"}
_CODES = {404: "model_not_found", 429: "rate_limit_exceeded", 401: "invalid_api_key"}


@dataclass(slots=True)
class EmbeddingsRequest:
    model: str
    texts: list[str] | None  # the texts, or
    ids: list[list[int]] | None  # token ids
    base64: bool
    dimensions: int | None


class OpenAIError(BadRequest):
    """A 400 that names the request field (`param`) it is about."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


def decode(payload: Any) -> EmbeddingsRequest:
    if not isinstance(payload, dict):
        raise OpenAIError('expected a JSON object {"model": ..., "input": ...}')
    model = payload.get("model")
    if not isinstance(model, str) or not model:
        raise OpenAIError('"model" must name a model', "model")
    fmt = payload.get("encoding_format", "float")
    if fmt not in ("float", "base64"):
        raise OpenAIError('"encoding_format" must be "float" or "base64"', "encoding_format")
    dimensions = payload.get("dimensions")
    if dimensions is not None and (
        not isinstance(dimensions, int) or isinstance(dimensions, bool) or dimensions < 1
    ):
        raise OpenAIError('"dimensions" must be a positive integer', "dimensions")
    user = payload.get("user")
    if user is not None and not isinstance(user, str):
        raise OpenAIError('"user" must be a string', "user")
    texts, ids = _input(payload.get("input"))
    return EmbeddingsRequest(model, texts, ids, fmt == "base64", dimensions)


def _input(value: Any) -> tuple[list[str] | None, list[list[int]] | None]:
    if isinstance(value, str):
        return [value], None
    if not isinstance(value, list) or not value:
        raise OpenAIError('"input" must be a string or a non-empty list', "input")
    if len(value) > MAX_INPUTS:
        raise OpenAIError(f'"input" has {len(value)} items; at most {MAX_INPUTS}', "input")
    if all(isinstance(v, str) for v in value):
        return value, None
    if all(_is_int(v) for v in value):
        return None, [value]
    if all(isinstance(v, list) and v and all(_is_int(t) for t in v) for v in value):
        return None, value
    raise OpenAIError(
        '"input" items must all be strings, or token ids (lists of integers)', "input"
    )


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def encode(vectors: np.ndarray, request: EmbeddingsRequest, model: str, tokens: int) -> bytes:
    data = []
    for index, vector in enumerate(vectors.astype("<f4", copy=False)):
        embedding: Any = (
            base64.b64encode(vector.tobytes()).decode("ascii") if request.base64 else vector
        )
        data.append({"object": "embedding", "index": index, "embedding": embedding})
    body = {
        "object": "list",
        "data": data,
        "model": model,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    }
    return orjson.dumps(body, option=orjson.OPT_SERIALIZE_NUMPY)


def error(exc: Exception) -> Answer:
    """`{"error": {...}}` in OpenAI's shape, with torchgate's status code."""
    if isinstance(exc, TorchgateError):
        status, message, headers = exc.status_code, exc.message, exc.headers
    else:
        status, message, headers = 500, "internal server error", {}
    kind = _TYPES.get(status, "invalid_request_error" if status < 500 else "server_error")
    body = {
        "error": {
            "message": message,
            "type": kind,
            "param": getattr(exc, "param", None),
            "code": _CODES.get(status),
        }
    }
    return json_answer(body, status, headers)


async def embeddings(request: Request) -> Answer:
    try:
        return await _answer(request)
    except TorchgateError as exc:
        context(request).error = exc.message
        if isinstance(exc, InputRefused) and getattr(exc, "param", None) is None:
            exc.param = "input"  # type: ignore[attr-defined]
        return error(exc)


async def _answer(request: Request) -> Answer:
    body = await read_body(request)
    asked = await inference.decode(body, lambda: decode(parse_json(body)))
    try:
        served = await inference.resolve(request, asked.model, None)
    except ModelNotFound as exc:
        raise _with_param(exc, "model") from None
    pre = served.model.preprocessor
    if not isinstance(pre, TextProcessor):
        raise OpenAIError(f"model {served.name} does not take text", "model")
    width = served.config.outputs[0].shape[-1]
    if asked.dimensions is not None and asked.dimensions != width:
        raise OpenAIError(
            f"model {served.name} makes {width}-dimensional embeddings and cannot shorten "
            "them: leave out dimensions",
            "dimensions",
        )
    with inference.admitted(request, served):
        return await _embed(request, served, pre, asked, body)


async def _embed(
    request: Request,
    served: ServedVersion,
    pre: TextProcessor,
    asked: EmbeddingsRequest,
    body: bytes,
) -> Answer:
    if asked.texts is not None:
        texts = asked.texts
        specs = served.config.processor_inputs
        assert specs is not None

        def screened() -> None:
            array = np.array(texts, dtype=object)
            inference.screen_text(request, served, [array], specs, processed=True)

        await inference.decode(body, screened)
        prepared = await prepare.prepare(request, served, list(texts))
    else:
        prepared = pre.prepare_ids(asked.ids or [])
        await prepare.spend_tokens(request, prepared.tokens)
    result = await inference.run(
        request, served, prepared.inputs, prepared.rows, material=prepared.keys
    )
    vectors = result.outputs[0].reshape(prepared.rows, -1)
    post = served.model.postprocessor
    if post is not None:
        vectors = post.predictions(vectors)
    content = encode(vectors, asked, served.name, prepared.tokens)
    return Answer(content, headers=inference.cache_header(request, result))


def _with_param(exc: TorchgateError, param: str) -> TorchgateError:
    exc.param = param  # type: ignore[attr-defined]
    return exc


ROUTES = [route("/v1/embeddings", "POST", Policy.INFER, embeddings)]

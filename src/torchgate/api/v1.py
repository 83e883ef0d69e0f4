"""The V1 protocol (KServe V1 / TF Serving style): `{"instances": [...]}` in,
`{"predictions": [...]}` out, over the shared request path."""

from __future__ import annotations

from typing import Any

import numpy as np
import orjson
from starlette.requests import Request

from torchgate.api import inference, prepare
from torchgate.api.body import V1_TYPES, media_type, read_body
from torchgate.api.codec import check_rows, check_shape, coerce, parse_json
from torchgate.api.routes import Policy, route
from torchgate.edge.context import context
from torchgate.edge.responses import Answer, json_answer
from torchgate.errors import BadRequest, ModelLoadError, UnsupportedMediaType
from torchgate.processors.image import MEDIA_TYPES
from torchgate.serving.model_config import ModelConfig
from torchgate.serving.registry import ModelRegistry
from torchgate.serving.residents import State, Status
from torchgate.serving.served import ServedVersion
from torchgate.serving.service import InferenceResult

_DUMPS = orjson.OPT_SERIALIZE_NUMPY


def decode(payload: Any, config: ModelConfig) -> tuple[list[np.ndarray], int]:
    """`{"instances": [row, ...]}` as one array per input, batch dim first."""
    if not isinstance(payload, dict) or "instances" not in payload:
        raise BadRequest('expected a JSON object {"instances": [row, ...]}')
    instances = payload["instances"]
    if not isinstance(instances, list):
        raise BadRequest('"instances" must be a list of rows')
    rows = len(instances)
    check_rows(rows, config)
    specs = config.inputs
    if len(specs) == 1 and not isinstance(instances[0], dict):
        columns = [instances]
    else:
        columns = []
        names = {s.name for s in specs}
        for i, row in enumerate(instances):
            if not isinstance(row, dict):
                raise BadRequest(f"row {i}: this model has several inputs, send objects")
            extra = set(row) - names
            if extra:
                raise BadRequest(f"row {i}: unknown input {sorted(extra)[0]!r}")
        for spec in specs:
            try:
                columns.append([row[spec.name] for row in instances])
            except KeyError:
                raise BadRequest(f"input {spec.name!r} is missing from a row") from None
    arrays = []
    for spec, column in zip(specs, columns, strict=True):
        what = f"input {spec.name!r}"
        array = coerce(column, spec, what)
        check_shape(array, spec, rows, what)
        arrays.append(array if config.batched else array[0])
    return arrays, rows


def encode(result: InferenceResult) -> bytes:
    served = result.served
    config = served.config
    outputs = [o if config.batched else o[np.newaxis] for o in result.outputs]
    post = served.model.postprocessor
    top: dict[str, Any] = {}
    if post is not None:
        top = post.top(outputs[0])
        outputs[0] = post.predictions(outputs[0])
    outputs = [np.ascontiguousarray(o) for o in outputs]
    if len(outputs) == 1:
        predictions: Any = outputs[0]
    else:
        names = [s.name for s in config.outputs]
        predictions = [
            {n: o[i] for n, o in zip(names, outputs, strict=True)}
            for i in range(outputs[0].shape[0])
        ]
    body: dict[str, Any] = {
        "predictions": predictions,
        "model_name": served.name,
        "model_version": str(served.version),
    }
    if top:
        body.update(top)
    elif result.top is not None and config.labels is not None:
        body["labels"] = [config.labels[i] for i in result.top.tolist()]
        body["probabilities"] = result.top_probability
    return orjson.dumps(body, option=_DUMPS)


async def predict(request: Request) -> Answer:
    served = await inference.resolve(request)
    with inference.admitted(request, served):  # or 503 at once, before the body is read
        body = await read_body(request, V1_TYPES)
        result = await _answer(request, served, body)
        return Answer(encode(result), headers=inference.cache_header(request, result))


async def _answer(request: Request, served: ServedVersion, body: bytes) -> InferenceResult:
    pre = served.model.preprocessor
    media = media_type(request)
    if media in MEDIA_TYPES:  # a raw image body: one row
        if pre is None or media not in pre.media_types:
            taken = ", ".join(pre.media_types) if pre is not None and pre.media_types else "JSON"
            raise UnsupportedMediaType(f"model {served.name} takes {taken}, not {media}")
        return await _processed(request, served, [body])

    def decoded() -> tuple[list[np.ndarray], int] | list[object]:
        payload = parse_json(body)
        if prepare.v1_wants_processor(payload, served.config):
            items = prepare.v1_items(payload, served.config)
            specs = served.config.processor_inputs
            assert specs is not None
            arrays = [np.array(items, dtype=object)]
            inference.screen_text(request, served, arrays, specs, processed=True)
            return items
        inputs, rows = decode(payload, served.config)
        inference.screen_text(request, served, inputs, served.config.inputs)
        return inputs, rows

    found = await inference.decode(body, decoded)
    if isinstance(found, list):
        return await _processed(request, served, found)
    inputs, rows = found
    return await inference.run(request, served, inputs, rows)


async def _processed(
    request: Request, served: ServedVersion, items: list[object]
) -> InferenceResult:
    """Images or texts through the model's preprocessor, then the request path."""
    prepared = await prepare.prepare(request, served, items)
    return await inference.run(
        request, served, prepared.inputs, prepared.rows, material=prepared.keys
    )


async def model_status(request: Request) -> Answer:
    """`GET /v1/models/{name}`: the state of a model's versions, those the gate refused
    (`serving.admission`) included, with the reason; for a model not loaded now
    (`serving.residency`), its version folders LOADING or UNLOADED, and why."""
    name = context(request).params["name"]
    registry = inference.registry_of(request)
    residency = registry.residency.status(name)
    if name not in registry and residency is not None:
        return _unloaded_status(registry, name, residency)
    served = registry.get(name)
    statuses: list[dict[str, Any]] = [
        {
            "version": str(number),
            "state": "AVAILABLE" if v.batcher.accepting else "UNLOADING",
            "circuit": v.breaker.state.name.lower(),
            "device": str(v.model.device),
            "sha256": v.model.sha256,
            "resident_bytes": v.model.resident_bytes,
        }
        for number, v in served.versions.items()
    ]
    statuses += [
        {"version": str(n), "state": "UNAVAILABLE", "reason": reason}
        for n, reason in served.refused.items()
    ]
    body = {
        "name": served.name,
        "default_version": str(served.default_version),
        "load": served.config.load,
        "residency": "loaded",
        "model_version_status": sorted(statuses, key=lambda s: int(s["version"])),
    }
    return json_answer(body)


def _unloaded_status(registry: ModelRegistry, name: str, residency: Status) -> Answer:
    """A model this server knows but has not loaded: loading now, or why not."""
    try:
        numbers = registry.repository.versions(name)  # a directory listing: cheap
    except ModelLoadError:
        numbers = []
    loading = residency.state is State.LOADING
    state = "LOADING" if loading else "UNLOADED"
    reason = "loading on demand" if loading else residency.reason
    body = {
        "name": name,
        "load": residency.policy,
        "residency": residency.state.value,
        "reason": reason,
        "model_version_status": [
            {"version": str(n), "state": state, "reason": reason} for n in numbers
        ],
    }
    return json_answer(body)


ROUTES = [
    route("/predict", "POST", Policy.INFER, predict),
    route("/v1/models/{name}:predict", "POST", Policy.INFER, predict),
    route("/v1/models/{name}/versions/{version}:predict", "POST", Policy.INFER, predict),
    route("/v1/models/{name}", "GET", Policy.INFER, model_status),
]

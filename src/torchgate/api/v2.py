"""The V2 protocol (Open Inference Protocol, as Triton and KServe speak it): health,
metadata and `infer` routes with the JSON tensor codec, over the shared request path.

Binary tensors (the `binary_tensor_data` extension) are read and written by `api.binary`;
the model repository extension lives in `api.v2_repository`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson
from fastapi import APIRouter, Request
from starlette.responses import Response

from torchgate import __version__
from torchgate.api import binary, inference, prepare, v2_repository, v2_stats
from torchgate.api.codec import (
    check_declared,
    check_rows,
    check_shape,
    coerce,
    element_count,
    parse_json,
)
from torchgate.api.deps import V2_TYPES, MetricsDep, Registry, read_body
from torchgate.api.health import readiness_problems
from torchgate.api.v2_stats import PLATFORM
from torchgate.errors import BadRequest, ModelNotFound, ModelNotReady, Unavailable
from torchgate.serving.breaker import BreakerState
from torchgate.serving.datatypes import NUMPY
from torchgate.serving.model_config import ModelConfig, TensorSpec
from torchgate.serving.registry import ModelRegistry, ServedModel
from torchgate.serving.service import InferenceResult

router = APIRouter(tags=["v2"])
router.include_router(v2_repository.router)

EXTENSIONS = ["binary_tensor_data", "model_repository", "model_configuration", "statistics"]

_DUMPS = orjson.OPT_SERIALIZE_NUMPY
_ENVELOPE = 'expected a JSON object {"inputs": [{"name", "shape", "datatype", "data"}, ...]}'


@dataclass(slots=True)
class Wanted:
    """One output to answer with: its index in the signature and whether it goes binary."""

    index: int
    binary: bool


@dataclass(slots=True)
class InferRequest:
    """A decoded V2 request: one array per model input (in signature order) and the rest."""

    inputs: list[np.ndarray]
    rows: int
    outputs: list[Wanted]
    id: str | None = None


# the codec ----------------------------------------------------------------------------------


def decode(
    payload: Any,
    config: ModelConfig,
    data: memoryview,
    inputs: tuple[TensorSpec, ...] | None = None,
) -> InferRequest:
    """A V2 request (JSON header plus its binary part) checked against the signature (or
    against `inputs`, the preprocessor's, when the request carries those)."""
    if not isinstance(payload, dict) or not isinstance(payload.get("inputs"), list):
        raise BadRequest(_ENVELOPE)
    signature = config.inputs if inputs is None else inputs
    request_id = payload.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise BadRequest('"id" must be a string')
    binary_output = _parameters(payload, "request").get("binary_data_output", False)
    if not isinstance(binary_output, bool):
        raise BadRequest("binary_data_output must be true or false")
    specs = {s.name: s for s in signature}
    given: dict[str, np.ndarray] = {}
    reader = binary.BinaryReader(data)
    for index, tensor in enumerate(payload["inputs"]):
        name, array = _input(tensor, index, specs, config, reader)
        if name in given:
            raise BadRequest(f"input {name!r} is given twice")
        given[name] = array
    reader.finish()
    for spec in signature:
        if spec.name not in given:
            raise BadRequest(f"input {spec.name!r} is missing")
    arrays = [given[s.name] for s in signature]
    rows = _rows(arrays, config, signature)
    wanted = _outputs(payload.get("outputs"), config, binary_output)
    return InferRequest(arrays, rows, wanted, request_id)


def _input(
    tensor: Any,
    index: int,
    specs: dict[str, TensorSpec],
    config: ModelConfig,
    reader: binary.BinaryReader,
) -> tuple[str, np.ndarray]:
    if not isinstance(tensor, dict) or not isinstance(tensor.get("name"), str):
        raise BadRequest(f'inputs[{index}] must be an object with a "name"')
    name = tensor["name"]
    spec = specs.get(name)
    if spec is None:
        raise BadRequest(f"unknown input {_shown(name)}; the model takes {_names(specs)}")
    what = f"input {name!r}"
    datatype = tensor.get("datatype")
    if not isinstance(datatype, str) or datatype not in NUMPY:
        raise BadRequest(f"{what}: unknown datatype {_shown(datatype)}")
    if datatype != spec.datatype:
        raise BadRequest(f"{what}: datatype {datatype} does not match the model's {spec.datatype}")
    shape = tensor.get("shape")
    if not isinstance(shape, list):
        raise BadRequest(f'{what}: "shape" must be a list of integers')
    try:
        count = element_count(shape)
    except BadRequest as exc:
        raise BadRequest(f"{what}: {exc.message}") from None
    check_declared(shape, spec, config, what)
    size = _parameters(tensor, what).get("binary_data_size")
    if size is not None:
        if "data" in tensor:
            raise BadRequest(f'{what}: send "data" or binary_data_size, not both')
        return name, binary.read_tensor(reader.take(size, what), datatype, shape, count, what)
    if "data" not in tensor:
        raise BadRequest(f'{what}: no "data" and no binary_data_size')
    array = coerce(tensor["data"], spec, what)
    if array.size != count:
        raise BadRequest(f"{what}: data has {array.size} values, shape {shape} needs {count}")
    return name, array.reshape(shape)


def _rows(arrays: list[np.ndarray], config: ModelConfig, signature: tuple[TensorSpec, ...]) -> int:
    """The batch size (the first dimension, the same for every input) after shape checks."""
    if not config.batched:
        for spec, array in zip(signature, arrays, strict=True):
            check_shape(array, spec, None, f"input {spec.name!r}")
        return 1
    rows = arrays[0].shape[0] if arrays[0].ndim else -1
    for spec, array in zip(signature, arrays, strict=True):
        check_shape(array, spec, rows, f"input {spec.name!r}")
    check_rows(rows, config)
    return rows


def _outputs(raw: Any, config: ModelConfig, binary_output: bool) -> list[Wanted]:
    if not raw:
        return [Wanted(i, binary_output) for i in range(len(config.outputs))]
    if not isinstance(raw, list):
        raise BadRequest('"outputs" must be a list of {"name": ...} objects')
    index = {s.name: i for i, s in enumerate(config.outputs)}
    wanted: list[Wanted] = []
    for i, item in enumerate(raw):
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            raise BadRequest(f'outputs[{i}] must be an object with a "name"')
        name = item["name"]
        if name not in index:
            raise BadRequest(f"unknown output {_shown(name)}; the model has {_names(index)}")
        if any(w.index == index[name] for w in wanted):
            raise BadRequest(f"output {name!r} is asked for twice")
        what = f"output {name!r}"
        parameters = _parameters(item, what)
        if "classification" in parameters:
            raise BadRequest(f"{what}: the classification extension is not supported")
        as_binary = parameters.get("binary_data", binary_output)
        if not isinstance(as_binary, bool):
            raise BadRequest(f"{what}: binary_data must be true or false")
        wanted.append(Wanted(index[name], as_binary))
    return wanted


def _parameters(holder: dict[str, Any], what: str) -> dict[str, Any]:
    parameters = holder.get("parameters")
    if parameters is None:
        return {}
    if not isinstance(parameters, dict):
        raise BadRequest(f'{what}: "parameters" must be an object')
    if any(isinstance(k, str) and k.startswith("shared_memory") for k in parameters):
        raise BadRequest(f"{what}: the shared memory extension is not supported")
    return parameters


def _shown(value: object) -> str:
    return repr(value[:64]) if isinstance(value, str) else type(value).__name__


def _names(names: dict[str, Any]) -> str:
    return ", ".join(repr(n) for n in names)


def encode(result: InferenceResult, request: InferRequest) -> tuple[bytes, int | None]:
    """The response body, and the JSON header's length when binary outputs follow it."""
    served = result.served
    body: dict[str, Any] = {"model_name": served.name, "model_version": str(served.version)}
    if request.id is not None:
        body["id"] = request.id
    outputs: list[dict[str, Any]] = []
    chunks: list[bytes] = []
    for want in request.outputs:
        spec = served.config.outputs[want.index]
        array = result.outputs[want.index]
        entry: dict[str, Any] = {
            "name": spec.name,
            "datatype": spec.datatype,
            "shape": list(array.shape),
        }
        if want.binary:
            raw = binary.tensor_bytes(array, spec.datatype)
            chunks.append(raw)
            entry["parameters"] = {"binary_data_size": len(raw)}
        else:
            entry["data"] = _json_data(array, spec.datatype)
        outputs.append(entry)
    body["outputs"] = outputs
    header = orjson.dumps(body, option=_DUMPS)
    if not chunks:
        return header, None
    return b"".join([header, *chunks]), len(header)


def _json_data(array: np.ndarray, datatype: str) -> Any:
    if datatype == "BYTES":
        return [
            x.decode("utf-8", "replace") if isinstance(x, bytes) else str(x)
            for x in array.reshape(-1)
        ]
    if datatype == "BF16":
        return (array.astype(np.uint32) << 16).view(np.float32).ravel()
    return np.ascontiguousarray(array).ravel()


# routes -------------------------------------------------------------------------------------


def _json(body: object) -> Response:
    return Response(orjson.dumps(body), media_type="application/json")


@router.get("/v2", summary="Server metadata")
async def server_metadata() -> Response:
    return _json({"name": "torchgate", "version": __version__, "extensions": EXTENSIONS})


@router.get("/v2/health/live", summary="Liveness")
async def live() -> Response:
    return _json({"live": True})


@router.get("/v2/health/ready", summary="Readiness, by the same rule as /health/ready")
async def ready(request: Request) -> Response:
    problems = readiness_problems(request)
    if problems:
        raise Unavailable(f"not ready: {'; '.join(problems)}")
    return _json({"ready": True})


def model_metadata(served: ServedModel) -> dict[str, Any]:
    """A model's V2 metadata: its versions and signature, batch dim as -1 when it batches."""
    config = served.config
    batch = [-1] if config.batched else []

    def tensor(spec: TensorSpec) -> dict[str, Any]:
        return {"name": spec.name, "datatype": spec.datatype, "shape": [*batch, *spec.shape]}

    body: dict[str, Any] = {
        "name": served.name,
        "versions": [str(v) for v in sorted(served.versions)],
        "platform": PLATFORM,
        "inputs": [tensor(s) for s in config.inputs],
        "outputs": [tensor(s) for s in config.outputs],
    }
    if config.processor_inputs is not None and config.preprocess is not None:
        # torchgate's own field: what a request may carry instead of the inputs above
        body["preprocess"] = {
            "kind": config.preprocess.kind,
            "inputs": [tensor(s) for s in config.processor_inputs],
        }
    return body


# before "/v2/models/{name}": "stats" is every model's statistics, as in Triton
@router.get("/v2/models/stats", summary="Inference statistics of every model")
async def all_statistics(registry: Registry, metrics: MetricsDep) -> Response:
    return _json(v2_stats.statistics(registry, metrics, None, None))


@router.get("/v2/models/{name}", summary="Model metadata")
async def metadata(name: str, registry: Registry) -> Response:
    return _json(model_metadata(registry.get(name)))


@router.get("/v2/models/{name}/versions/{version}", summary="Model metadata of one version")
async def version_metadata(name: str, version: str, registry: Registry) -> Response:
    registry.resolve(name, version)
    return _json(model_metadata(registry.get(name)))


@router.get("/v2/models/{name}/config", summary="Model configuration (Triton's shape)")
async def model_config(name: str, registry: Registry) -> Response:
    return _json(v2_stats.model_config(registry.get(name), registry.resolve(name)))


@router.get(
    "/v2/models/{name}/versions/{version}/config", summary="Model configuration, one version"
)
async def version_config(name: str, version: str, registry: Registry) -> Response:
    return _json(v2_stats.model_config(registry.get(name), registry.resolve(name, version)))


@router.get("/v2/models/{name}/stats", summary="Inference statistics of a model's versions")
async def model_statistics(name: str, registry: Registry, metrics: MetricsDep) -> Response:
    return _json(v2_stats.statistics(registry, metrics, name, None))


@router.get(
    "/v2/models/{name}/versions/{version}/stats", summary="Inference statistics of one version"
)
async def version_statistics(
    name: str, version: str, registry: Registry, metrics: MetricsDep
) -> Response:
    return _json(v2_stats.statistics(registry, metrics, name, version))


async def _model_ready(registry: ModelRegistry, name: str, version: str | None) -> Response:
    try:
        served = registry.resolve(name, version)
    except ModelNotFound:
        if name not in registry and await v2_repository.on_disk(registry, name):
            raise ModelNotReady(f"model {name} is not loaded") from None
        raise
    if not served.batcher.accepting:
        raise ModelNotReady(f"model {served.model.key} is not accepting requests")
    if served.breaker.state is BreakerState.OPEN:
        raise ModelNotReady(f"model {served.model.key} is failing: its circuit is open")
    return _json({"name": served.name, "version": str(served.version), "ready": True})


@router.get("/v2/models/{name}/ready", summary="Model readiness")
async def model_ready(name: str, registry: Registry) -> Response:
    return await _model_ready(registry, name, None)


@router.get("/v2/models/{name}/versions/{version}/ready", summary="Version readiness")
async def version_ready(name: str, version: str, registry: Registry) -> Response:
    return await _model_ready(registry, name, version)


async def _infer(request: Request, name: str | None, version: str | None) -> Response:
    body = await read_body(request, V2_TYPES)
    served = inference.resolve(request, name, version)
    header, data = binary.split(body, request.headers.get(binary.HEADER_LENGTH))

    def decoder() -> tuple[InferRequest, bool]:
        payload = parse_json(header)
        processed = prepare.v2_wants_processor(payload, served.config)
        specs = served.config.processor_inputs if processed else served.config.inputs
        assert specs is not None
        decoded = decode(payload, served.config, data, specs)
        inference.screen_text(request, served, decoded.inputs, specs, processed)
        return decoded, processed

    decoded, processed = await inference.decode(body, decoder)
    if not processed:
        result = await inference.run(request, served, decoded.inputs, decoded.rows)
    else:
        items = prepare.v2_items(decoded.inputs[0])
        prepared = await prepare.prepare(request, served, items)
        result = await inference.run(
            request, served, prepared.inputs, prepared.rows, material=prepared.keys
        )
    content, header_length = encode(result, decoded)
    headers = inference.cache_header(request, result)
    if header_length is None:
        return Response(content, media_type="application/json", headers=headers)
    headers[binary.HEADER_LENGTH] = str(header_length)
    return Response(content, media_type="application/octet-stream", headers=headers)


# the hot routes (served by `api.hot.HotRoutes`), each with its handler
ROUTES = [
    ("/v2/models/{name}/infer", _infer),
    ("/v2/models/{name}/versions/{version}/infer", _infer),
]

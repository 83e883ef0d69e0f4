"""The V2 codec (Open Inference Protocol): a JSON (and binary) request checked against a
model's signature into one array per input, and outputs back into JSON or binary tensors.

Binary tensors (the `binary_tensor_data` extension) are read and written by `api.binary`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson

from torchgate.api import binary
from torchgate.api.codec import (
    check_declared,
    check_rows,
    check_shape,
    coerce,
    element_count,
)
from torchgate.errors import BadRequest
from torchgate.serving.datatypes import NUMPY
from torchgate.serving.model_config import ModelConfig, TensorSpec
from torchgate.serving.service import InferenceResult

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

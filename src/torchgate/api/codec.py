"""The codec layer both protocols share: JSON parsing, tensor coercion and validation.

A request becomes one numpy array per model input (batch dim first), checked against the
model's signature: names, datatype, shape, finiteness and row count. Conversion is done by
numpy in C; no per-element Python validation.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import orjson

from torchgate.errors import BadRequest
from torchgate.serving.datatypes import NUMPY
from torchgate.serving.model_config import ModelConfig, TensorSpec

MAX_ELEMENTS = 1 << 28
MAX_RANK = 8
MAX_STRINGS = 1 << 16  # BYTES elements in one request: each costs Python work to check


def parse_json(body: bytes) -> Any:
    if not body:
        raise BadRequest("empty body: expected a JSON object")
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        # orjson refuses NaN/Infinity literals and nesting past 1024 levels here, too
        raise BadRequest(f"malformed JSON: {exc.msg} at byte {exc.pos}") from None


def coerce(value: Any, spec: TensorSpec, what: str) -> np.ndarray:
    """A JSON value as an array of the spec's datatype; 400 for anything that is not."""
    if spec.datatype == "BYTES":
        return _text(value, what)
    try:
        array = np.asarray(value)
    except (ValueError, TypeError, OverflowError, RecursionError):
        raise BadRequest(f"{what}: rows must be nested lists of one shape") from None
    kind = array.dtype.kind
    target = NUMPY[spec.datatype]
    if kind not in "biuf":
        if kind == "O":
            raise BadRequest(f"{what}: rows must be nested lists of numbers of one shape")
        raise BadRequest(f"{what}: expected numbers ({spec.datatype}), got {_kind_name(kind)}")
    if spec.datatype == "BOOL":
        if kind != "b":
            raise BadRequest(f"{what}: expected true/false (BOOL)")
        return array
    if spec.datatype == "BF16":  # its numpy stand-in is uint16, so before the integer rules
        return _bfloat16(array, what)
    if target.kind in "iu":
        if kind == "f" and target == np.uint64:
            array = _uint64(value, array)
        if array.dtype.kind == "f":
            raise BadRequest(f"{what}: expected integers ({spec.datatype}), got decimals")
        if array.size:
            info = np.iinfo(target)
            if array.min() < info.min or array.max() > info.max:
                raise BadRequest(f"{what}: values out of range for {spec.datatype}")
        return array.astype(target, copy=False)
    # a finite JSON number (orjson refuses NaN and Infinity) that the narrower float cannot
    # hold would become inf: refuse it before the cast (cheaper than np.errstate)
    narrower = array.size and target.itemsize < array.dtype.itemsize
    if narrower and np.abs(array).max() > np.finfo(target).max:
        raise BadRequest(f"{what}: NaN and infinite values are not accepted")
    return array.astype(target, copy=False)


def _bfloat16(array: np.ndarray, what: str) -> np.ndarray:
    """Floats as BF16 bit patterns, rounded to nearest even as torch rounds them."""
    as_float = array.astype(np.float32)
    _finite(as_float, what)
    bits = as_float.view(np.uint32)
    rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)
    if ((rounded & 0x7F80) == 0x7F80).any():
        raise BadRequest(f"{what}: values out of range for BF16")
    return rounded


def _uint64(value: Any, array: np.ndarray) -> np.ndarray:
    """Integers past INT64's range make numpy guess float64; read them again as UINT64."""
    try:
        exact = np.asarray(value, dtype=np.uint64)
    except (ValueError, TypeError, OverflowError):
        return array
    return exact if np.array_equal(exact, array) else array


def _finite(array: np.ndarray, what: str) -> None:
    """Refuse NaN and infinities (from binary tensors or casts)."""
    if array.dtype.kind == "f" and not np.isfinite(array).all():
        raise BadRequest(f"{what}: NaN and infinite values are not accepted")


def _text(value: Any, what: str) -> np.ndarray:
    # the count along the first row is known before numpy builds millions of objects
    check_string_count(_first_path_count(value), what)
    try:
        array = np.asarray(value, dtype=object)
    except (ValueError, TypeError, RecursionError):
        raise BadRequest(f"{what}: rows must be nested lists of strings of one shape") from None
    flat = array.reshape(-1)
    check_string_count(flat.size, what)
    for item in flat:
        if not isinstance(item, str | bytes):
            raise BadRequest(f"{what}: expected strings (BYTES)")
    return array


def _first_path_count(value: Any) -> int:
    """Elements of nested lists if every level were as long as its first element is."""
    count = 1
    while isinstance(value, list) and value:
        count *= len(value)
        value = value[0]
    return count


def check_string_count(count: int, what: str) -> None:
    if count > MAX_STRINGS:
        raise BadRequest(f"{what}: {count} strings in one request; at most {MAX_STRINGS}")


def _kind_name(kind: str) -> str:
    return {"U": "strings", "S": "bytes", "O": "mixed values"}.get(kind, "non-numbers")


def check_shape(array: np.ndarray, spec: TensorSpec, rows: int | None, what: str) -> None:
    """The array's shape must be (rows, *spec.shape), -1 matching any size."""
    check_dims(array.shape, spec, rows, what)


def check_dims(got: tuple[int, ...], spec: TensorSpec, rows: int | None, what: str) -> None:
    """A shape (given or declared) against (rows, *spec.shape), -1 matching any size.

    `rows` is the request's row count, -1 when any count will do (a V2 tensor's declared
    shape), or None for a model without a batch dimension. The message speaks of rows and
    of the row shape model.toml declares, since that is the shape a user wrote down."""
    row = spec.shape
    if rows is None:
        if not _fits(got, row):
            raise BadRequest(
                f"{what}: shape {list(got)} does not match the model's {_dims(row)}, "
                "the shape model.toml declares (this model takes no batch dimension)"
            )
        return
    if _fits(got, (rows, *row)):
        return
    declared = f"{_dims(row)} as model.toml declares"
    if rows == -1:
        hint = f"; for one row send {_dims((1, *row))}" if _fits(got, row) else ""
        raise BadRequest(
            f"{what}: shape {list(got)} does not match the model's {_dims((-1, *row))}: "
            f"the number of rows, then each row's shape {declared}{hint}"
        )
    if got and _fits(got[1:], row):
        plural = "row" if got[0] == 1 else "rows"
        raise BadRequest(f"{what}: {got[0]} {plural}, but the request's other inputs have {rows}")
    sent = "are single values" if len(got) == 1 else f"have shape {list(got[1:])}"
    raise BadRequest(f"{what}: each row must have shape {declared}; the rows sent {sent}")


def _fits(got: tuple[int, ...], want: tuple[int, ...]) -> bool:
    return len(got) == len(want) and all(w in (-1, g) for w, g in zip(want, got, strict=True))


def _dims(shape: tuple[int, ...]) -> str:
    return f"[{', '.join(str(d) for d in shape)}]"


def check_declared(shape: list[int], spec: TensorSpec, config: ModelConfig, what: str) -> None:
    """A declared shape (V2) against the signature and the batch bound, before any of its
    data is read or allocated."""
    if not config.batched:
        check_dims(tuple(shape), spec, None, what)
        return
    check_dims(tuple(shape), spec, -1, what)
    check_rows(shape[0], config)


def check_rows(rows: int, config: ModelConfig) -> None:
    if rows < 1:
        raise BadRequest("at least one row is needed")
    if config.batched and rows > config.max_batch_size:
        raise BadRequest(
            f"{rows} rows in one request; this model takes at most {config.max_batch_size}"
        )
    if not config.batched and rows != 1:
        raise BadRequest("this model takes no batch dimension: send exactly one instance")


def element_count(shape: list[int] | tuple[int, ...]) -> int:
    """Product of a shape's dimensions, refusing negative ones, too many of them, and absurd
    sizes (each checked on its own, so a zero cannot hide a dimension of 2**63)."""
    if len(shape) > MAX_RANK:
        raise BadRequest(f"shape has {len(shape)} dimensions; at most {MAX_RANK} are accepted")
    total = 1
    for dim in shape:
        if not isinstance(dim, int) or isinstance(dim, bool) or dim < 0:
            raise BadRequest(f"shape {list(shape)}: dimensions must be non-negative integers")
        if dim > MAX_ELEMENTS:
            raise BadRequest(f"shape {list(shape)}: dimension {dim} is too large")
        total *= dim
        if total > MAX_ELEMENTS:
            raise BadRequest(f"shape {list(shape)} has too many elements")
    return total

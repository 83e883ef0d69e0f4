"""The codecs without HTTP: JSON values to typed arrays, shapes against model.toml's row
shape, and the V2 binary body's split, each refusal a sentence a client can act on."""

from __future__ import annotations

import numpy as np
import pytest

from torchgate.api import binary, codec
from torchgate.errors import BadRequest
from torchgate.serving.model_config import ModelConfig, TensorSpec


def spec(datatype: str = "FP32", shape: tuple[int, ...] = (4,)) -> TensorSpec:
    return TensorSpec(name="x", datatype=datatype, shape=shape)


def refused(call, *args) -> str:
    with pytest.raises(BadRequest) as error:
        call(*args)
    return error.value.message


def test_json_parsing_names_the_byte():
    assert codec.parse_json(b'{"a": 1}') == {"a": 1}
    assert refused(codec.parse_json, b"") == "empty body: expected a JSON object"
    assert refused(codec.parse_json, b'{"a": NaN}').startswith("malformed JSON:")
    assert "at byte" in refused(codec.parse_json, b'{"a": ')


@pytest.mark.parametrize(
    ("datatype", "value", "dtype"),
    [
        ("FP32", [[1, 2.5]], np.float32),
        ("INT64", [[1, -2]], np.int64),
        ("UINT8", [[0, 255]], np.uint8),
        ("BOOL", [[True, False]], np.bool_),
        ("UINT64", [[2**64 - 1]], np.uint64),
    ],
)
def test_values_become_the_declared_type(datatype, value, dtype):
    array = codec.coerce(value, spec(datatype), "input x")
    assert array.dtype == dtype
    np.testing.assert_array_equal(array, np.asarray(value, dtype=dtype))


@pytest.mark.parametrize(
    ("datatype", "value", "message"),
    [
        ("FP32", [[1, 2], [3]], "input x: rows must be nested lists"),
        ("FP32", [["a", "b"]], "input x: expected numbers (FP32), got strings"),
        ("INT32", [[1.5]], "input x: expected integers (INT32), got decimals"),
        ("UINT8", [[256]], "input x: values out of range for UINT8"),
        ("BOOL", [[1, 0]], "input x: expected true/false (BOOL)"),
        ("FP16", [[1e300]], "input x: NaN and infinite values are not accepted"),
        ("BYTES", [[1, 2]], "input x: expected strings (BYTES)"),
    ],
)
def test_a_value_of_the_wrong_kind_is_refused(datatype, value, message):
    assert refused(codec.coerce, value, spec(datatype), "input x").startswith(message)


def test_bf16_rounds_as_torch_does():
    import torch

    values = [1.0, 1.00390625, -2.5, 3.14159]
    bits = codec.coerce([values], spec("BF16"), "x")
    expected = torch.tensor(values, dtype=torch.bfloat16).view(torch.int16).numpy()
    np.testing.assert_array_equal(bits[0], expected.view(np.uint16))


def test_shape_errors_speak_of_rows_and_the_declared_row_shape():
    x = spec(shape=(4, 4))
    codec.check_dims((2, 4, 4), x, 2, "input x")
    assert refused(codec.check_dims, (4,), x, 1, "input x") == (
        "input x: each row must have shape [4, 4] as model.toml declares; "
        "the rows sent are single values"
    )
    assert refused(codec.check_dims, (3, 4, 4), x, 2, "input x") == (
        "input x: 3 rows, but the request's other inputs have 2"
    )
    assert refused(codec.check_dims, (4, 4), x, -1, "input x").endswith(
        "; for one row send [1, 4, 4]"
    )


def test_row_counts_are_bounded_by_the_model():
    config = ModelConfig(
        max_batch_size=8,
        inputs=({"name": "x", "datatype": "FP32", "shape": (4,)},),
        outputs=({"name": "y", "datatype": "FP32", "shape": (4,)},),
    )
    codec.check_rows(8, config)
    assert refused(codec.check_rows, 0, config) == "at least one row is needed"
    assert refused(codec.check_rows, 9, config) == (
        "9 rows in one request; this model takes at most 8"
    )


def test_element_counts_refuse_absurd_shapes_before_any_allocation():
    assert codec.element_count([2, 3, 4]) == 24
    assert "dimensions; at most 8" in refused(codec.element_count, [1] * 9)
    with pytest.raises(BadRequest):
        codec.element_count([0, 2**63])


def test_string_counts_are_bounded_before_numpy_builds_them():
    too_many = [[""] * 300] * 300
    assert "90000 strings in one request" in refused(codec.coerce, too_many, spec("BYTES"), "x")


def test_the_binary_split_names_the_header_length_mistake():
    header, rest = binary.split(b'{"inputs": []}\x01\x02', "14")
    assert header == b'{"inputs": []}' and bytes(rest) == b"\x01\x02"
    assert binary.split(b'{"inputs": []}', None)[0] == b'{"inputs": []}'
    assert "must be a non-negative integer" in refused(binary.split, b"{}", "-1")
    assert "but the body has only 2 bytes" in refused(binary.split, b"{}", "5")
    assert "are not a whole JSON object" in refused(binary.split, b'{"a": 1}', "4")
    assert "no Inference-Header-Content-Length header" in refused(
        binary.split, b'{"inputs": [{"parameters": {"binary_data_size": 4}}]}\x00\x00\x00\x00', None
    )

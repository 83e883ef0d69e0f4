"""Every kind of malformed V2 request gets its status and a clear `{"error": ...}`, and the
server goes on serving: one server takes them all, a good request after each."""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator

import httpx
import numpy as np
import pytest

from tests.api.test_v2 import AUTH, X, binary_request, build_repo, clean_settings
from tests.support import ServerThread
from torchgate.api import binary
from torchgate.errors import BadRequest

DIGITS = "/v2/models/digits/infer"
PAIR = "/v2/models/pair/infer"
IMAGE = {"name": "input", "shape": [1, 1, 8, 8], "datatype": "FP32"}
ZEROS = [0.0] * 64
PIXELS = np.zeros((1, 1, 8, 8), dtype=np.float32).tobytes()
HEADER = "Inference-Header-Content-Length"


def j(payload: object) -> bytes:
    return json.dumps(payload).encode()


def image(**fields: object) -> bytes:
    """A digits request whose one input has `fields` changed."""
    return j({"inputs": [{**IMAGE, "data": ZEROS, **fields}]})


def pair(*tensors: dict) -> bytes:
    return j({"inputs": list(tensors)})


def a(**fields: object) -> dict:
    return {"name": "a", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4], **fields}


def b(**fields: object) -> dict:
    return {"name": "b", "shape": [1, 4], "datatype": "INT64", "data": [1, 2, 3, 4], **fields}


def raw(tensor: dict, data: bytes, extra: bytes = b"", **header: str | bytes) -> tuple[bytes, dict]:
    """A binary request with one binary input, `extra` bytes after it, headers overridden."""
    body, headers = binary_request([(tensor, data)])
    return body + extra, {**headers, **header}


def with_size(size: object) -> tuple[bytes, dict]:
    tensor = {**IMAGE, "parameters": {"binary_data_size": size}}
    body, headers = binary_request([(tensor, None)])
    return body + PIXELS, {**headers, HEADER: str(len(body))}


NAN = np.full((1, 1, 8, 8), np.nan, dtype=np.float32).tobytes()
CASES: list[tuple[str, str, bytes | tuple[bytes, dict], int, str]] = [
    # the envelope
    ("not json", DIGITS, b"{inputs", 400, "malformed JSON"),
    ("empty body", DIGITS, b"", 400, "empty body"),
    ("v1 envelope", DIGITS, j({"instances": [ZEROS]}), 400, 'expected a JSON object {"inputs"'),
    ("inputs not a list", DIGITS, j({"inputs": {}}), 400, 'expected a JSON object {"inputs"'),
    ("a list body", DIGITS, j([IMAGE]), 400, 'expected a JSON object {"inputs"'),
    ("input not an object", DIGITS, j({"inputs": [5]}), 400, "inputs[0] must be an object"),
    ("input without name", DIGITS, j({"inputs": [{"shape": [1]}]}), 400, 'with a "name"'),
    ("id not a string", DIGITS, j({"id": 5, "inputs": []}), 400, '"id" must be a string'),
    (
        "parameters not an object",
        DIGITS,
        j({"parameters": [], "inputs": []}),
        400,
        '"parameters" must be an object',
    ),
    (
        "binary_data_output not bool",
        DIGITS,
        j({"parameters": {"binary_data_output": "yes"}, "inputs": []}),
        400,
        "binary_data_output must be true or false",
    ),
    (
        "shared memory",
        DIGITS,
        image(parameters={"shared_memory_region": "r"}),
        400,
        "shared memory extension is not supported",
    ),
    # inputs against the signature
    ("missing input", PAIR, pair(a()), 400, "input 'b' is missing"),
    (
        "extra input",
        PAIR,
        pair(a(), b(), {**b(), "name": "c"}),
        400,
        "unknown input 'c'; the model takes 'a', 'b'",
    ),
    ("input twice", PAIR, pair(a(), b(), a()), 400, "input 'a' is given twice"),
    ("no inputs", PAIR, pair(), 400, "input 'a' is missing"),
    ("unknown datatype", DIGITS, image(datatype="FP128"), 400, "unknown datatype 'FP128'"),
    ("datatype not a string", DIGITS, image(datatype=32), 400, "unknown datatype int"),
    (
        "datatype mismatch",
        DIGITS,
        image(datatype="FP64"),
        400,
        "datatype FP64 does not match the model's FP32",
    ),
    (
        "BYTES for a numeric input",
        DIGITS,
        image(datatype="BYTES", data=["0"] * 64),
        400,
        "datatype BYTES does not match the model's FP32",
    ),
    (
        "BYTES for an INT64 input",
        PAIR,
        pair(a(), b(datatype="BYTES", data=["1"] * 4)),
        400,
        "datatype BYTES does not match the model's INT64",
    ),
    (
        "strings as numbers",
        DIGITS,
        image(data=["0"] * 64),
        400,
        "expected numbers (FP32), got strings",
    ),
    (
        "decimals for INT64",
        PAIR,
        pair(a(), b(data=[1.5, 2, 3, 4])),
        400,
        "expected integers (INT64)",
    ),
    ("non-finite value", DIGITS, image(data=[1e39] * 64), 400, "infinite"),
    (
        "NaN literal",
        DIGITS,
        b'{"inputs": [{"name": "input", "shape": [1], "datatype": "FP32", "data": [NaN]}]}',
        400,
        "malformed JSON",
    ),
    ("no data", DIGITS, j({"inputs": [IMAGE]}), 400, 'no "data" and no binary_data_size'),
    # shapes
    (
        "data shorter than shape",
        DIGITS,
        image(data=[0.0] * 10),
        400,
        "data has 10 values, shape [1, 1, 8, 8] needs 64",
    ),
    ("nested data too long", DIGITS, image(data=[[0.0] * 8] * 9), 400, "data has 72 values"),
    ("ragged data", DIGITS, image(data=[[0.0] * 8, [0.0]]), 400, "nested lists"),
    (
        "negative dimension",
        DIGITS,
        image(shape=[-1, 1, 8, 8]),
        400,
        "dimensions must be non-negative integers",
    ),
    (
        "fractional dimension",
        DIGITS,
        image(shape=[1.0, 1, 8, 8]),
        400,
        "dimensions must be non-negative integers",
    ),
    (
        "boolean dimension",
        DIGITS,
        image(shape=[True, 1, 8, 8]),
        400,
        "dimensions must be non-negative integers",
    ),
    ("shape not a list", DIGITS, image(shape="1x1x8x8"), 400, '"shape" must be a list of integers'),
    ("huge dimensions", DIGITS, image(shape=[2**32, 2**32, 8, 8]), 400, "is too large"),
    (
        "64-bit overflow",
        DIGITS,
        image(shape=[2**63 - 1, 2**63 - 1, 2**63 - 1]),
        400,
        "is too large",
    ),
    (
        "dimension past 64 bits",
        DIGITS,
        image(shape=[2**64, 1]),
        400,
        "dimensions must be non-negative integers",
    ),
    (
        "shape off the signature",
        DIGITS,
        image(shape=[1, 8, 8]),
        400,
        "shape [1, 8, 8] does not match the model's [-1, 1, 8, 8]",
    ),
    (
        "row shape off the signature",
        DIGITS,
        image(shape=[1, 1, 8, 7], data=[0.0] * 56),
        400,
        "does not match the model's [-1, 1, 8, 8]",
    ),
    (
        "too many rows",
        DIGITS,
        image(shape=[65, 1, 8, 8], data=ZEROS * 65),
        400,
        "65 rows in one request; this model takes at most 64",
    ),
    ("zero rows", DIGITS, image(shape=[0, 1, 8, 8], data=[]), 400, "at least one row"),
    (
        "batch sizes differ",
        PAIR,
        pair(a(shape=[2, 4], data=[0] * 8), b()),
        400,
        "input 'b': 1 row, but the request's other inputs have 2",
    ),
    # outputs
    (
        "unknown output",
        DIGITS,
        j({"inputs": [{**IMAGE, "data": ZEROS}], "outputs": [{"name": "probs"}]}),
        400,
        "unknown output 'probs'; the model has 'logits'",
    ),
    (
        "outputs not a list",
        DIGITS,
        j({"inputs": [{**IMAGE, "data": ZEROS}], "outputs": {"name": "logits"}}),
        400,
        '"outputs" must be a list',
    ),
    (
        "output without name",
        DIGITS,
        j({"inputs": [{**IMAGE, "data": ZEROS}], "outputs": [{}]}),
        400,
        'outputs[0] must be an object with a "name"',
    ),
    (
        "output twice",
        DIGITS,
        j({"inputs": [{**IMAGE, "data": ZEROS}], "outputs": [{"name": "logits"}] * 2}),
        400,
        "asked for twice",
    ),
    (
        "binary_data not bool",
        DIGITS,
        j(
            {
                "inputs": [{**IMAGE, "data": ZEROS}],
                "outputs": [{"name": "logits", "parameters": {"binary_data": 1}}],
            }
        ),
        400,
        "binary_data must be true or false",
    ),
    (
        "classification",
        DIGITS,
        j(
            {
                "inputs": [{**IMAGE, "data": ZEROS}],
                "outputs": [{"name": "logits", "parameters": {"classification": 3}}],
            }
        ),
        400,
        "classification extension is not supported",
    ),
    # the binary extension
    (
        "binary_data_size past the end",
        DIGITS,
        with_size(len(PIXELS) + 1),
        400,
        "binary_data_size 257 is past the end of the body (256 bytes of binary data left)",
    ),
    (
        "binary_data_size negative",
        DIGITS,
        with_size(-4),
        400,
        "binary_data_size must be a non-negative integer",
    ),
    (
        "binary_data_size a string",
        DIGITS,
        with_size("256"),
        400,
        "binary_data_size must be a non-negative integer",
    ),
    (
        "binary size off the shape",
        DIGITS,
        with_size(8),
        400,
        "8 bytes of binary data, shape [1, 1, 8, 8] of FP32 needs 256",
    ),
    (
        "binary data past every input",
        DIGITS,
        raw(IMAGE, PIXELS, b"\0" * 12),
        400,
        "12 bytes of binary data belong to no input",
    ),
    ("binary data without the header length", DIGITS, image() + PIXELS, 400, "malformed JSON"),
    (
        "data and binary_data_size",
        DIGITS,
        raw({**IMAGE, "data": ZEROS}, PIXELS),
        400,
        'send "data" or binary_data_size, not both',
    ),
    (
        "header length past the end",
        DIGITS,
        raw(IMAGE, PIXELS, **{HEADER: "99999"}),
        400,
        "Inference-Header-Content-Length is 99999 but the body has only",
    ),
    (
        "header length not an integer",
        DIGITS,
        raw(IMAGE, PIXELS, **{HEADER: "ten"}),
        400,
        "Inference-Header-Content-Length must be a non-negative integer",
    ),
    (
        "header length negative",
        DIGITS,
        raw(IMAGE, PIXELS, **{HEADER: "-5"}),
        400,
        "Inference-Header-Content-Length must be a non-negative integer",
    ),
    (
        "header length in other digits",
        DIGITS,
        raw(IMAGE, PIXELS, **{HEADER: "²".encode("latin-1")}),
        400,
        "Inference-Header-Content-Length must be a non-negative integer",
    ),
    (
        "header length huge",
        DIGITS,
        raw(IMAGE, PIXELS, **{HEADER: "9" * 40}),
        400,
        "Inference-Header-Content-Length must be a non-negative integer",
    ),
    (
        "header length cuts the JSON",
        DIGITS,
        raw(IMAGE, PIXELS, **{HEADER: "10"}),
        400,
        "Inference-Header-Content-Length is 10, but the body's first 10 bytes are not a whole "
        "JSON object: it must be the length in bytes of the JSON part alone",
    ),
    (
        "header length runs into the tensors",
        DIGITS,
        raw(IMAGE, PIXELS, **{HEADER: "123"}),
        400,
        "Inference-Header-Content-Length is 123, but the body's first 123 bytes are not a whole",
    ),
    (
        "binary_data_size without the header length",
        DIGITS,
        (raw(IMAGE, PIXELS)[0], {"content-type": "application/octet-stream"}),
        400,
        "the body carries binary tensors (binary_data_size) but no "
        "Inference-Header-Content-Length header",
    ),
    ("binary NaN", DIGITS, raw(IMAGE, NAN), 400, "NaN and infinite values are not accepted"),
    (
        "binary BOOL not 0 or 1",
        "/v2/models/echo-bool/infer",
        raw({"name": "x", "shape": [1, 3], "datatype": "BOOL"}, b"\x00\x01\x02"),
        400,
        "BOOL bytes must be 0 or 1",
    ),
    (
        "binary BF16 NaN",
        "/v2/models/echo-bf16/infer",
        raw(
            {"name": "x", "shape": [1, 3], "datatype": "BF16"},
            struct.pack("<3H", 0x3F80, 0x7FC0, 0),
        ),
        400,
        "NaN and infinite values are not accepted",
    ),
    (
        "numbers for BOOL",
        "/v2/models/echo-bool/infer",
        j({"inputs": [{"name": "x", "shape": [1, 3], "datatype": "BOOL", "data": [1, 0, 1]}]}),
        400,
        "expected true/false (BOOL)",
    ),
    (
        "INT8 out of range",
        "/v2/models/echo-int8/infer",
        j({"inputs": [{"name": "x", "shape": [1, 3], "datatype": "INT8", "data": [1, 300, 2]}]}),
        400,
        "values out of range for INT8",
    ),
    (
        "BF16 out of range",
        "/v2/models/echo-bf16/infer",
        j({"inputs": [{"name": "x", "shape": [1, 3], "datatype": "BF16", "data": [1, 3.4e38, 2]}]}),
        400,
        "values out of range for BF16",
    ),
    # routing and media types
    (
        "text/plain",
        DIGITS,
        (image(), {"Content-Type": "text/plain"}),
        415,
        "content type 'text/plain' is not supported",
    ),
    ("unknown model", "/v2/models/nope/infer", image(), 404, "unknown model nope"),
    (
        "unknown version",
        "/v2/models/digits/versions/9/infer",
        image(),
        404,
        "model digits has no version 9",
    ),
    ("version not a number", "/v2/models/digits/versions/x/infer", image(), 404, "no version"),
    ("traversal", "/v2/models/..%2F..%2Fetc/infer", image(), 404, "not found"),
]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerThread]:
    repo = build_repo(tmp_path_factory.mktemp("models"))
    with ServerThread(clean_settings(repo)) as running:
        yield running


GOOD = {"inputs": [{**IMAGE, "data": X[0].ravel().tolist()}]}


@pytest.mark.parametrize(
    ("path", "request_", "status", "fragment"),
    [
        pytest.param(path, req, status, fragment, id=name)
        for name, path, req, status, fragment in CASES
    ],
)
def test_malformed_request_then_a_good_one(server, path, request_, status, fragment):
    body, headers = request_ if isinstance(request_, tuple) else (request_, {})
    headers = {"Content-Type": "application/json", **headers, **AUTH}
    with httpx.Client(base_url=server.url, timeout=30) as client:
        r = client.post(path, content=body, headers=headers)
        assert r.status_code == status, r.text
        assert r.headers["content-type"] == "application/json"
        assert fragment in r.json()["error"]
        assert "Traceback" not in r.text and 'File "' not in r.text and "/src/" not in r.text
        good = client.post(DIGITS, json=GOOD, headers=AUTH)
        assert good.status_code == 200, good.text


@pytest.mark.parametrize(
    ("data", "fragment"),
    [
        (b"\x05\x00\x00", "3 bytes of binary data cannot hold 1 BYTES elements"),
        (struct.pack("<I", 9) + b"abc", "element 0 runs past its data"),
        (
            struct.pack("<I", 1) + b"a" + struct.pack("<I", 0),
            "4 bytes of BYTES data after 1 elements",
        ),
    ],
)
def test_malformed_binary_bytes_tensors(data, fragment):
    with pytest.raises(BadRequest, match=fragment):
        binary.read_tensor(memoryview(data), "BYTES", [1], 1, "input 'x'")

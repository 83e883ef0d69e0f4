"""The V2 protocol (Open Inference Protocol) over HTTP: metadata, health, JSON and binary
tensors of every datatype, output selection, and the model repository extension."""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from torch import nn

from tests.support import (
    MODELS,
    ServerThread,
    TwoInputs,
    copy_digits,
    doubler_toml,
    write_model,
)
from torchgate.api import binary, v2_codec
from torchgate.config import Settings
from torchgate.serving.datatypes import NUMPY
from torchgate.serving.model_config import ModelConfig

AUTH = {"Authorization": "Bearer test"}
X = np.load(MODELS / "digits" / "validation.npz")["x"]
DATATYPES = [d for d in NUMPY if d != "BYTES"]  # no TorchScript model takes strings


class Echo(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.clone()


class Twice(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * 2


def pair_toml() -> str:
    """TwoInputs: `a` FP32 [4] and `b` INT64 [4] -> `sum` FP32 [4], `dot` FP32 per row."""
    return "\n".join(
        [
            "max_batch_size = 8",
            '[[inputs]]\nname = "a"\ndatatype = "FP32"\nshape = [4]',
            '[[inputs]]\nname = "b"\ndatatype = "INT64"\nshape = [4]',
            '[[outputs]]\nname = "sum"\ndatatype = "FP32"\nshape = [4]',
            '[[outputs]]\nname = "dot"\ndatatype = "FP32"\nshape = []',
        ]
    )


def echo_toml(datatype: str) -> str:
    tensor = f'datatype = "{datatype}"\nshape = [3]'
    return (
        f'max_batch_size = 4\n[[inputs]]\nname = "x"\n{tensor}\n[[outputs]]\nname = "y"\n{tensor}\n'
    )


def build_repo(repo: Path) -> Path:
    """digits, `pair` (TwoInputs), `scalar` (no batch dim), and one `echo-<type>` per type."""
    copy_digits(repo)
    write_model(repo, "pair", TwoInputs(), pair_toml())
    write_model(repo, "scalar", Twice(), doubler_toml(max_batch_size=0))
    for datatype in DATATYPES:
        write_model(repo, f"echo-{datatype.lower()}", Echo(), echo_toml(datatype))
    return repo


def clean_settings(repo: Path, **overrides: object) -> Settings:
    """Settings for a server shared by a whole module, as the `make_settings` fixture makes
    them (auth and rate limit off, no TORCHGATE_* from the environment): a fixture of
    function scope cannot feed one of module scope."""
    overrides.setdefault("auth", "off")
    overrides.setdefault("rate_limit", "off")
    with pytest.MonkeyPatch.context() as env:
        for key in [k for k in os.environ if k.startswith("TORCHGATE_")]:
            env.delenv(key)
        return Settings(models=repo, device="cpu", **overrides)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerThread]:
    repo = build_repo(tmp_path_factory.mktemp("models"))
    with ServerThread(clean_settings(repo)) as running:
        yield running


@pytest.fixture
def client(server: ServerThread) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, headers=AUTH, timeout=30) as c:
        yield c


def binary_request(
    inputs: list[tuple[dict, bytes | None]], **fields: object
) -> tuple[bytes, dict[str, str]]:
    """A binary-extension body: each input with bytes gets `binary_data_size`."""
    tensors, chunks = [], []
    for tensor, raw in inputs:
        if raw is not None:
            tensor = {**tensor, "parameters": {"binary_data_size": len(raw)}}
            chunks.append(raw)
        tensors.append(tensor)
    header = json.dumps({"inputs": tensors, **fields}).encode()
    headers = {
        "Inference-Header-Content-Length": str(len(header)),
        "Content-Type": "application/octet-stream",
    }
    return header + b"".join(chunks), headers


def binary_response(r: httpx.Response) -> tuple[dict, dict[str, bytes]]:
    """The JSON header and each binary output's bytes."""
    assert r.headers["content-type"] == "application/octet-stream"
    size = int(r.headers["inference-header-content-length"])
    header = json.loads(r.content[:size])
    raw, offset = {}, size
    for out in header["outputs"]:
        if "data" in out:
            continue
        n = out["parameters"]["binary_data_size"]
        raw[out["name"]] = r.content[offset : offset + n]
        offset += n
    assert offset == len(r.content)
    return header, raw


def digits_forward(rows: np.ndarray) -> np.ndarray:
    module = torch.jit.load(str(MODELS / "digits" / "1" / "model.pt"))
    with torch.inference_mode():
        return module(torch.from_numpy(rows)).numpy()


# metadata and health ------------------------------------------------------------------------


def test_server_metadata_and_health(client):
    from torchgate import __version__

    assert client.get("/v2").json() == {
        "name": "torchgate",
        "version": __version__,
        "extensions": ["binary_tensor_data", "model_repository"],
    }
    assert client.get("/v2/health/live").status_code == 200
    r = client.get("/v2/health/ready")
    assert r.status_code == 200 and r.json() == {"ready": True}


def test_ready_is_503_with_reasons_while_draining(server, client):
    server.app.state.draining = True
    try:
        r = client.get("/v2/health/ready")
        assert r.status_code == 503 and "draining" in r.json()["error"]
    finally:
        server.app.state.draining = False
    assert client.get("/v2/health/ready").status_code == 200


def test_model_metadata(client):
    digits = client.get("/v2/models/digits").json()
    assert digits == {
        "name": "digits",
        "versions": ["1"],
        "platform": "pytorch_libtorch",
        "inputs": [{"name": "input", "datatype": "FP32", "shape": [-1, 1, 8, 8]}],
        "outputs": [{"name": "logits", "datatype": "FP32", "shape": [-1, 10]}],
        # what a request may carry instead: a picture of a digit ([preprocess])
        "preprocess": {
            "kind": "image",
            "inputs": [{"name": "image", "datatype": "BYTES", "shape": [-1, 1]}],
        },
    }
    assert client.get("/v2/models/digits/versions/1").json() == digits
    pair = client.get("/v2/models/pair").json()
    assert [t["datatype"] for t in pair["inputs"]] == ["FP32", "INT64"]
    assert pair["outputs"][1] == {"name": "dot", "datatype": "FP32", "shape": [-1]}
    assert client.get("/v2/models/scalar").json()["inputs"][0]["shape"] == [4]
    for path in ("/v2/models/nope", "/v2/models/digits/versions/9"):
        r = client.get(path)
        assert r.status_code == 404 and "error" in r.json()


def test_model_readiness(client):
    assert client.get("/v2/models/digits/ready").status_code == 200
    assert client.get("/v2/models/digits/versions/1/ready").status_code == 200
    assert client.get("/v2/models/nope/ready").status_code == 404
    assert client.get("/v2/models/digits/versions/2/ready").status_code == 404


# inference ----------------------------------------------------------------------------------


@pytest.mark.parametrize("nested", [False, True])
def test_json_infer_matches_a_direct_forward(client, nested):
    rows = X[:5]
    data = rows.tolist() if nested else rows.ravel().tolist()
    body = {
        "id": "req-1",
        "parameters": {"priority": 1},
        "inputs": [{"name": "input", "shape": [5, 1, 8, 8], "datatype": "FP32", "data": data}],
    }
    r = client.post("/v2/models/digits/infer", json=body)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "application/json"
    out = r.json()
    assert out["model_name"] == "digits" and out["model_version"] == "1" and out["id"] == "req-1"
    [logits] = out["outputs"]
    assert logits["name"] == "logits" and logits["datatype"] == "FP32"
    assert logits["shape"] == [5, 10]
    got = np.array(logits["data"], dtype=np.float32).reshape(5, 10)
    np.testing.assert_allclose(got, digits_forward(rows), rtol=1e-4, atol=1e-4)


def test_binary_infer_matches_a_direct_forward(client):
    rows = X[:7]
    tensor = {"name": "input", "shape": [7, 1, 8, 8], "datatype": "FP32"}
    body, headers = binary_request(
        [(tensor, rows.tobytes())], parameters={"binary_data_output": True}
    )
    r = client.post("/v2/models/digits/versions/1/infer", content=body, headers=headers)
    assert r.status_code == 200, r.text
    header, raw = binary_response(r)
    assert header["outputs"][0]["shape"] == [7, 10] and "data" not in header["outputs"][0]
    got = np.frombuffer(raw["logits"], dtype="<f4").reshape(7, 10)
    np.testing.assert_allclose(got, digits_forward(rows), rtol=1e-4, atol=1e-4)


def test_binary_input_json_output_without_content_type(client):
    """tritonclient.http sends binary requests with no content type at all."""
    tensor = {"name": "input", "shape": [1, 1, 8, 8], "datatype": "FP32"}
    body, headers = binary_request([(tensor, X[:1].tobytes())])
    del headers["Content-Type"]
    r = client.post("/v2/models/digits/infer", content=body, headers=headers)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "application/json"
    assert "inference-header-content-length" not in r.headers
    assert len(r.json()["outputs"][0]["data"]) == 10


def test_outputs_selection_and_mixed_binary(client):
    a = np.arange(8, dtype=np.float32).reshape(2, 4)
    b = np.array([[1, 2, 3, 4], [-1, 0, 1, 2]], dtype=np.int64)
    inputs = [
        {"name": "a", "shape": [2, 4], "datatype": "FP32", "data": a.ravel().tolist()},
        {"name": "b", "shape": [2, 4], "datatype": "INT64", "data": b.tolist()},
    ]
    only_dot = client.post(
        "/v2/models/pair/infer", json={"inputs": inputs, "outputs": [{"name": "dot"}]}
    ).json()
    assert [o["name"] for o in only_dot["outputs"]] == ["dot"]
    assert only_dot["outputs"][0]["shape"] == [2]
    assert only_dot["outputs"][0]["data"] == (a * b).sum(1).tolist()

    outputs = [{"name": "dot"}, {"name": "sum", "parameters": {"binary_data": True}}]
    r = client.post("/v2/models/pair/infer", json={"inputs": inputs, "outputs": outputs})
    header, raw = binary_response(r)
    assert [o["name"] for o in header["outputs"]] == ["dot", "sum"]
    assert header["outputs"][0]["data"] == (a * b).sum(1).tolist()
    np.testing.assert_array_equal(np.frombuffer(raw["sum"], "<f4").reshape(2, 4), a + b)


def test_binary_and_json_inputs_mix(client):
    a = np.ones((1, 4), dtype=np.float32)
    body, headers = binary_request(
        [
            ({"name": "b", "shape": [1, 4], "datatype": "INT64", "data": [1, 2, 3, 4]}, None),
            ({"name": "a", "shape": [1, 4], "datatype": "FP32"}, a.tobytes()),
        ]
    )
    r = client.post("/v2/models/pair/infer", content=body, headers=headers)
    assert r.status_code == 200, r.text
    assert r.json()["outputs"][0]["data"] == [2.0, 3.0, 4.0, 5.0]


def _values(datatype: str) -> tuple[np.ndarray, list]:
    """Two rows of three values of `datatype` (extremes included), and how JSON writes them."""
    if datatype == "BOOL":
        array = np.array([[True, False, True], [False, False, True]])
        return array, array.tolist()
    if datatype == "BF16":
        floats = np.array([[1.5, -2.0, 256.0], [0.0, -0.5, 2.0**100]], dtype=np.float32)
        return (floats.view(np.uint32) >> 16).astype(np.uint16), floats.tolist()
    dtype = NUMPY[datatype]
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        array = np.array([[info.min, 0, info.max], [1, 2, 3]], dtype=dtype)
    else:
        info = np.finfo(dtype)
        array = np.array([[float(info.max), -0.25, 1.5], [0.0, -2.0, 100.0]], dtype=dtype)
    return array, array.tolist()


@pytest.mark.parametrize("datatype", DATATYPES)
@pytest.mark.parametrize("wire", ["json", "binary"])
def test_every_datatype_round_trips(client, datatype, wire):
    array, as_json = _values(datatype)
    tensor = {"name": "x", "shape": [2, 3], "datatype": datatype}
    path = f"/v2/models/echo-{datatype.lower()}/infer"
    if wire == "json":
        r = client.post(path, json={"inputs": [{**tensor, "data": as_json}]})
        assert r.status_code == 200, r.text
        [out] = r.json()["outputs"]
        assert out["datatype"] == datatype and out["shape"] == [2, 3]
        got = np.array(out["data"], dtype=np.float32 if datatype == "BF16" else array.dtype)
        expected = array if datatype != "BF16" else np.array(as_json, dtype=np.float32)
        np.testing.assert_array_equal(got.reshape(2, 3), expected)
    else:
        body, headers = binary_request(
            [(tensor, array.tobytes())], parameters={"binary_data_output": True}
        )
        r = client.post(path, content=body, headers=headers)
        assert r.status_code == 200, r.text
        header, raw = binary_response(r)
        assert header["outputs"][0]["datatype"] == datatype
        assert raw["y"] == array.tobytes()


def test_a_model_without_batch_dim_answers_the_whole_output(client):
    tensor = {"name": "x", "shape": [4], "datatype": "FP32", "data": [1, 2, 3, 4]}
    r = client.post("/v2/models/scalar/infer", json={"inputs": [tensor]})
    assert r.status_code == 200, r.text
    assert r.json()["outputs"][0] == {
        "name": "y",
        "datatype": "FP32",
        "shape": [4],
        "data": [2.0, 4.0, 6.0, 8.0],
    }


def test_a_model_without_batch_dim_takes_the_shape_as_is(client):
    tensor = {"name": "x", "shape": [4], "datatype": "FP32", "data": [1, 2, 3, 4]}
    assert client.post("/v2/models/scalar/infer", json={"inputs": [tensor]}).status_code == 200
    batched = {**tensor, "shape": [1, 4]}
    r = client.post("/v2/models/scalar/infer", json={"inputs": [batched]})
    assert r.status_code == 400 and "does not match the model's [4]" in r.json()["error"]


def test_v2_inference_is_counted_under_the_model(client):
    tensor = {"name": "x", "shape": [4], "datatype": "FP32", "data": [1, 2, 3, 4]}
    client.post("/v2/models/scalar/infer", json={"inputs": [tensor]})
    assert 'ai_requests_total{model="scalar",status="200"}' in client.get("/metrics").text


def test_binary_decode_uses_frombuffer_and_no_python_floats(monkeypatch):
    """64 rows of FP32[512] are one np.frombuffer and one copy, never Python floats."""
    config = ModelConfig.model_validate(
        {
            "max_batch_size": 64,
            "inputs": [{"name": "x", "datatype": "FP32", "shape": [512]}],
            "outputs": [{"name": "y", "datatype": "FP32", "shape": [512]}],
        }
    )
    rows = np.random.default_rng(0).standard_normal((64, 512), dtype=np.float32)
    tensor = {"name": "x", "shape": [64, 512], "datatype": "FP32"}
    body, headers = binary_request([(tensor, rows.tobytes())])
    calls: list[int] = []
    frombuffer = np.frombuffer

    def spy(buffer, *args, **kwargs):
        calls.append(len(buffer))
        return frombuffer(buffer, *args, **kwargs)

    def no_coerce(*args, **kwargs):
        raise AssertionError("binary tensors must not go through the JSON coercion")

    monkeypatch.setattr(binary.np, "frombuffer", spy)
    monkeypatch.setattr(v2_codec, "coerce", no_coerce)
    header, data = binary.split(body, headers["Inference-Header-Content-Length"])
    decoded = v2_codec.decode(json.loads(header), config, data)
    assert calls == [64 * 512 * 4]
    [array] = decoded.inputs
    assert array.dtype == np.float32 and array.flags.writeable and array.shape == (64, 512)
    np.testing.assert_array_equal(array, rows)


def test_binary_bytes_tensors_round_trip():
    raw = b"".join(struct.pack("<I", len(s)) + s for s in (b"ab", b"", "é".encode()))
    array = binary.read_tensor(memoryview(raw), "BYTES", [1, 3], 3, "input 'x'")
    assert array.tolist() == [[b"ab", b"", "é".encode()]]
    assert binary.tensor_bytes(array, "BYTES") == raw


# the model repository extension ---------------------------------------------------------------


def test_repository_index_and_model_control_off_by_default(client):
    r = client.post("/v2/repository/index")
    assert r.status_code == 200
    index = {e["name"]: e for e in r.json()}
    assert index["digits"] == {"name": "digits", "version": "1", "state": "READY", "reason": ""}
    assert len(index) == 3 + len(DATATYPES)
    assert client.post("/v2/repository/index", json={"ready": True}).json() == r.json()
    for action in ("load", "unload"):
        r = client.post(f"/v2/repository/models/digits/{action}")
        assert r.status_code == 403 and "TORCHGATE_MODEL_CONTROL=explicit" in r.json()["error"]
    assert client.get("/v2/models/digits/ready").status_code == 200


def test_load_and_unload_with_explicit_model_control(tmp_path, make_settings):
    repo = tmp_path / "models"
    copy_digits(repo)
    write_model(repo, "pair", TwoInputs(), pair_toml())
    broken = repo / "broken"
    (broken / "1").mkdir(parents=True)
    (broken / "1" / "model.pt").write_bytes(b"not a model")
    settings = make_settings(models=repo, model_control="explicit")
    with (
        ServerThread(settings) as server,
        httpx.Client(base_url=server.url, headers=AUTH, timeout=60) as c,
    ):
        (broken / "model.toml").write_text(doubler_toml())  # appears after start-up
        index = {(e["name"], e["version"]): e for e in c.post("/v2/repository/index").json()}
        assert index[("broken", "1")]["state"] == "UNAVAILABLE"
        assert index[("broken", "1")]["reason"] == "unloaded"
        assert c.get("/v2/models/broken/ready").status_code == 503

        r = c.post("/v2/repository/models/broken/load")
        assert r.status_code == 400
        error = r.json()["error"]
        assert "broken/1/model.pt: not a loadable TorchScript archive" in error
        assert str(tmp_path) not in error
        r = c.post("/v2/repository/models/missing/load")
        assert r.status_code == 400 and str(tmp_path) not in r.json()["error"]
        assert c.post("/v2/repository/models/Bad..Name/load").status_code == 400
        r = c.post("/v2/repository/models/digits/load", json={"parameters": {"config": "{}"}})
        assert r.status_code == 400 and "not supported" in r.json()["error"]
        assert c.post("/v2/repository/models/nope/unload").status_code == 404

        assert c.post("/v2/repository/models/pair/unload").status_code == 200
        assert c.get("/v2/models/pair/ready").status_code == 503
        assert c.get("/v2/models/pair").status_code == 404
        tensor = {"name": "a", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}
        assert c.post("/v2/models/pair/infer", json={"inputs": [tensor]}).status_code == 404
        entry = [e for e in c.post("/v2/repository/index").json() if e["name"] == "pair"]
        assert entry == [
            {"name": "pair", "version": "1", "state": "UNAVAILABLE", "reason": "unloaded"}
        ]

        r = c.post("/v2/repository/models/pair/load")
        assert r.status_code == 200 and r.json()["versions"] == ["1"]
        assert c.get("/v2/models/pair/ready").status_code == 200
        ready = {e["name"] for e in c.post("/v2/repository/index", json={"ready": True}).json()}
        assert ready == {"digits", "pair"}

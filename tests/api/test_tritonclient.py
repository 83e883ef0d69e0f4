"""Triton's own client (`tritonclient.http` and its aio twin), unchanged, against torchgate:
probes, metadata, the repository index, binary and JSON inference, load and unload."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
import tritonclient.http as httpclient
import tritonclient.http.aio as aioclient
from torch import nn
from tritonclient.utils import InferenceServerException

from tests.api.test_v2 import X, pair_toml
from tests.support import ServerThread, TwoInputs, copy_digits, write_model
from torchgate.config import Settings


def auth() -> dict[str, str]:
    """Fresh headers per call: tritonclient writes Inference-Header-Content-Length into the
    dict it is given, which would leak into the next (JSON) request."""
    return {"Authorization": "Bearer test"}


class Masked(nn.Module):
    def forward(self, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        return x * keep.to(x.dtype)


MASKED_TOML = """max_batch_size = 16
[[inputs]]
name = "x"
datatype = "INT32"
shape = [3]
[[inputs]]
name = "keep"
datatype = "BOOL"
shape = [3]
[[outputs]]
name = "y"
datatype = "INT32"
shape = [3]
"""


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("models")
    copy_digits(root)
    write_model(root, "pair", TwoInputs(), pair_toml())
    write_model(root, "masked", Masked(), MASKED_TOML)
    return root


@pytest.fixture
def server(repo: Path, make_settings: Callable[..., Settings]) -> Iterator[ServerThread]:
    with ServerThread(make_settings(models=repo, model_control="explicit")) as running:
        yield running


@pytest.fixture
def client(server: ServerThread) -> Iterator[httpclient.InferenceServerClient]:
    c = httpclient.InferenceServerClient(url=f"127.0.0.1:{server.port}", network_timeout=60)
    try:
        yield c
    finally:
        c.close()


def forward(repo: Path, model: str, *arrays: np.ndarray) -> list[np.ndarray]:
    """The TorchScript file run directly with torch, for comparison."""
    module = torch.jit.load(str(repo / model / "1" / "model.pt"))
    with torch.inference_mode():
        out = module(*(torch.from_numpy(a) for a in arrays))
    return [t.numpy() for t in (out if isinstance(out, tuple) else (out,))]


def tensor(name: str, array: np.ndarray, datatype: str, binary: bool) -> httpclient.InferInput:
    given = httpclient.InferInput(name, list(array.shape), datatype)
    given.set_data_from_numpy(array, binary_data=binary)
    return given


@pytest.mark.slow
def test_probes_metadata_and_index(client):
    assert client.is_server_live(headers=auth())
    assert client.is_server_ready(headers=auth())
    assert client.is_model_ready("digits", headers=auth())
    assert client.is_model_ready("digits", "1", headers=auth())
    assert not client.is_model_ready("nope", headers=auth())
    server = client.get_server_metadata(headers=auth())
    assert server["name"] == "torchgate"
    assert "binary_tensor_data" in server["extensions"]
    meta = client.get_model_metadata("pair", headers=auth())
    assert meta["platform"] == "pytorch_libtorch" and meta["versions"] == ["1"]
    assert meta["inputs"] == [
        {"name": "a", "datatype": "FP32", "shape": [-1, 4]},
        {"name": "b", "datatype": "INT64", "shape": [-1, 4]},
    ]
    assert client.get_model_metadata("digits", "1", headers=auth())["name"] == "digits"
    with pytest.raises(InferenceServerException) as info:
        client.get_model_metadata("nope", headers=auth())
    assert info.value.status() == "404" and "unknown model" in info.value.message()
    index = client.get_model_repository_index(headers=auth())
    assert {(e["name"], e["state"]) for e in index} == {
        ("digits", "READY"),
        ("masked", "READY"),
        ("pair", "READY"),
    }


@pytest.mark.slow
@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_infer_matches_a_direct_forward(client, repo, binary):
    rows = X[:10]
    result = client.infer(
        "digits",
        [tensor("input", rows, "FP32", binary)],
        outputs=[httpclient.InferRequestedOutput("logits", binary_data=binary)],
        request_id="r-1",
        headers=auth(),
    )
    assert result.get_response()["id"] == "r-1"
    [expected] = forward(repo, "digits", rows)
    np.testing.assert_allclose(result.as_numpy("logits"), expected, rtol=1e-4, atol=1e-4)

    a = np.random.default_rng(1).standard_normal((3, 4)).astype(np.float32)
    b = np.arange(12, dtype=np.int64).reshape(3, 4) - 6
    result = client.infer(
        "pair",
        [tensor("a", a, "FP32", binary), tensor("b", b, "INT64", binary)],
        outputs=[
            httpclient.InferRequestedOutput("sum", binary_data=binary),
            httpclient.InferRequestedOutput("dot", binary_data=not binary),
        ],
        headers=auth(),
    )
    total, dot = forward(repo, "pair", a, b)
    np.testing.assert_allclose(result.as_numpy("sum"), total, rtol=1e-6)
    np.testing.assert_allclose(result.as_numpy("dot"), dot, rtol=1e-5)

    x = np.array([[1, -2, 3], [2**31 - 1, 5, -(2**31)]], dtype=np.int32)
    keep = np.array([[True, False, True], [True, True, False]])
    result = client.infer(
        "masked",
        [tensor("x", x, "INT32", binary), tensor("keep", keep, "BOOL", binary)],
        headers=auth(),
    )  # no outputs named: the client asks for all of them in binary
    np.testing.assert_array_equal(result.as_numpy("y"), forward(repo, "masked", x, keep)[0])


def test_only_the_requested_output_comes_back(client):
    a = np.ones((2, 4), dtype=np.float32)
    b = np.ones((2, 4), dtype=np.int64)
    result = client.infer(
        "pair",
        [tensor("a", a, "FP32", True), tensor("b", b, "INT64", True)],
        outputs=[httpclient.InferRequestedOutput("dot")],
        headers=auth(),
    )
    assert result.as_numpy("sum") is None
    np.testing.assert_array_equal(result.as_numpy("dot"), [4.0, 4.0])


@pytest.mark.slow
def test_errors_reach_the_client_as_messages(client):
    bad = tensor("input", X[:2, :, :4], "FP32", True)
    with pytest.raises(InferenceServerException) as info:
        client.infer("digits", [bad], headers=auth())
    assert info.value.status() == "400"
    assert "shape [2, 1, 4, 8] does not match the model's [-1, 1, 8, 8]" in info.value.message()
    assert client.is_model_ready("digits", headers=auth())


@pytest.mark.slow
def test_unload_then_load(client):
    a = np.ones((1, 4), dtype=np.float32)
    b = np.ones((1, 4), dtype=np.int64)
    inputs = [tensor("a", a, "FP32", True), tensor("b", b, "INT64", True)]
    client.unload_model("pair", headers=auth())
    assert not client.is_model_ready("pair", headers=auth())
    index = {e["name"]: e for e in client.get_model_repository_index(headers=auth())}
    assert index["pair"]["state"] == "UNAVAILABLE" and index["digits"]["state"] == "READY"
    with pytest.raises(InferenceServerException) as info:
        client.infer("pair", inputs, headers=auth())
    assert info.value.status() == "404"

    client.load_model("pair", headers=auth())
    assert client.is_model_ready("pair", headers=auth())
    np.testing.assert_array_equal(
        client.infer("pair", inputs, headers=auth()).as_numpy("sum"), [[2.0] * 4]
    )


@pytest.mark.slow
def test_a_server_without_model_control_refuses_load_and_unload(repo, make_settings):
    with ServerThread(make_settings(models=repo)) as server:
        client = httpclient.InferenceServerClient(url=f"127.0.0.1:{server.port}")
        try:
            for action in (client.load_model, client.unload_model):
                with pytest.raises(InferenceServerException) as info:
                    action("digits", headers=auth())
                assert info.value.status() == "403"
                assert "TORCHGATE_MODEL_CONTROL=explicit" in info.value.message()
            assert client.is_model_ready("digits", headers=auth())
        finally:
            client.close()


@pytest.mark.slow
def test_aio_client_32_concurrent_infers(server, repo):
    rows = X[:32]
    [expected] = forward(repo, "digits", rows)

    async def run() -> list[np.ndarray]:
        client = aioclient.InferenceServerClient(url=f"127.0.0.1:{server.port}")
        try:

            async def one(i: int) -> np.ndarray:
                given = aioclient.InferInput("input", [1, 1, 8, 8], "FP32")
                given.set_data_from_numpy(rows[i : i + 1], binary_data=i % 2 == 0)
                result = await client.infer("digits", [given], headers=auth())
                return result.as_numpy("logits")[0]

            assert await client.is_model_ready("digits", headers=auth())
            return await asyncio.gather(*(one(i) for i in range(32)))
        finally:
            await client.close()

    got = np.stack(asyncio.run(run()))
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)

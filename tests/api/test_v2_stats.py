"""Triton's model configuration and statistics extensions, read by Triton's own client:
what `get_model_config` and `get_inference_statistics` return is what torchgate serves
and what its /metrics counted."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from tests.support import (
    MODELS,
    Doubler,
    ServerThread,
    copy_digits,
    doubler_toml,
    metric,
    write_model,
)
from torchgate.config import Settings

pytestmark = pytest.mark.slow  # every test here takes a second or more

ROWS = np.load(MODELS / "digits" / "validation.npz")["x"][:8].astype(np.float32)


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("models")
    copy_digits(root)
    write_model(
        root,
        "twice",
        Doubler(),
        doubler_toml(max_batch_size=8) + "[cache]\nttl_s = 0\n",
        versions=(1, 2),
    )
    return root


@pytest.fixture
def server(repo: Path, make_settings: Callable[..., Settings]) -> Iterator[ServerThread]:
    with ServerThread(make_settings(models=repo)) as running:
        yield running


@pytest.fixture
def client(server: ServerThread) -> Iterator[httpclient.InferenceServerClient]:
    c = httpclient.InferenceServerClient(url=f"127.0.0.1:{server.port}", network_timeout=60)
    try:
        yield c
    finally:
        c.close()


def infer(client: httpclient.InferenceServerClient, rows: np.ndarray) -> None:
    given = httpclient.InferInput("input", list(rows.shape), "FP32")
    given.set_data_from_numpy(rows, binary_data=True)
    client.infer("digits", [given])


def test_model_config_is_model_toml_in_tritons_terms(client):
    config = client.get_model_config("digits")
    assert config["name"] == "digits"
    assert config["platform"] == "pytorch_libtorch" and config["backend"] == "pytorch"
    assert config["max_batch_size"] == 64
    assert config["input"] == [
        {
            "name": "input",
            "data_type": "TYPE_FP32",
            "dims": [1, 8, 8],
            "is_shape_tensor": False,
            "format": "FORMAT_NONE",
            "allow_ragged_batch": False,
            "optional": False,
        }
    ]
    assert config["output"] == [
        {
            "name": "logits",
            "data_type": "TYPE_FP32",
            "dims": [10],
            "is_shape_tensor": False,
            "label_filename": "",
        }
    ]
    assert config["dynamic_batching"]["max_queue_delay_microseconds"] == 0
    assert config["dynamic_batching"]["default_queue_policy"] == {
        "timeout_action": "REJECT",
        "default_timeout_microseconds": 10_000_000,
        "allow_timeout_override": False,
        "max_queue_size": 2048,
    }
    assert config["instance_group"][0]["kind"] == "KIND_CPU"
    assert config["instance_group"][0]["count"] == 1
    assert config["response_cache"] == {"enable": True}
    assert client.get_model_config("digits", "1") == config
    assert client.get_model_config("twice", "2")["response_cache"] == {"enable": False}


def test_config_and_stats_of_unknown_models_and_versions_are_404(client, server):
    for call in (
        lambda: client.get_model_config("nope"),
        lambda: client.get_model_config("digits", "7"),
        lambda: client.get_inference_statistics("nope"),
        lambda: client.get_inference_statistics("digits", "7"),
    ):
        with pytest.raises(InferenceServerException) as info:
            call()
        assert info.value.status() == "404"
    answer = httpx.get(server.url + "/v2/models/digits/versions/7/stats")
    assert answer.status_code == 404 and answer.json() == {"error": "model digits has no version 7"}


def test_statistics_are_what_the_metrics_counted(client, server):
    for i in range(5):
        infer(client, ROWS[i : i + 1])  # five rows, each computed
    infer(client, ROWS[5:8])  # three rows in one request
    for _ in range(3):
        infer(client, ROWS[0:1])  # answered from the cache
    for _ in range(2):  # refused: the wrong row shape
        bad = httpx.post(
            server.url + "/v2/models/digits/infer",
            json={
                "inputs": [{"name": "input", "shape": [1, 8], "datatype": "FP32", "data": [0] * 8}]
            },
        )
        assert bad.status_code == 400

    stats = client.get_inference_statistics("digits")
    text = httpx.get(server.url + "/metrics").text
    assert [(s["name"], s["version"]) for s in stats["model_stats"]] == [("digits", "1")]
    entry = stats["model_stats"][0]
    inference = entry["inference_stats"]
    assert inference["success"]["count"] == 9
    assert inference["fail"]["count"] == 2
    assert inference["queue"]["count"] == 9
    computed = metric(text, "torchgate_queue_wait_seconds_count", model="digits", version="1")
    assert computed == 6
    for stage in ("compute_input", "compute_infer", "compute_output"):
        assert inference[stage]["count"] == 6
    assert inference["cache_hit"]["count"] == 3 and inference["cache_miss"]["count"] == 6
    forwards = metric(text, "torchgate_batch_size_count", model="digits", version="1")
    rows = metric(text, "torchgate_batch_size_sum", model="digits", version="1")
    assert entry["execution_count"] == forwards
    assert entry["inference_count"] == rows + 3 == 11
    latency = metric(text, "ai_request_latency_seconds_sum", model="digits")
    answered = metric(text, "ai_request_latency_seconds_count", model="digits")
    assert answered == 11
    assert inference["success"]["ns"] == pytest.approx(latency * 9 / 11 * 1e9, rel=1e-6, abs=2)
    assert inference["success"]["ns"] + inference["fail"]["ns"] == pytest.approx(
        latency * 1e9, abs=2
    )
    queued = metric(text, "torchgate_queue_wait_seconds_sum", model="digits", version="1")
    assert inference["queue"]["ns"] == pytest.approx(queued * 1e9, abs=2)
    compute = metric(text, "torchgate_compute_seconds_sum", model="digits", version="1")
    assert inference["compute_infer"]["ns"] == pytest.approx(compute * 6 / forwards * 1e9, abs=2)
    for stat in inference.values():
        assert isinstance(stat["count"], int) and isinstance(stat["ns"], int)

    assert client.get_inference_statistics("digits", "1") == stats
    everything = client.get_inference_statistics()
    assert {(s["name"], s["version"]) for s in everything["model_stats"]} == {
        ("digits", "1"),
        ("twice", "1"),
        ("twice", "2"),
    }


def test_a_models_requests_are_spread_over_its_versions_by_what_each_queued(client, server):
    with httpx.Client(base_url=server.url) as http:
        for version, times in (("1", 3), ("2", 1)):
            for i in range(times):
                answer = http.post(
                    f"/v2/models/twice/versions/{version}/infer",
                    json={
                        "inputs": [
                            {"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [i, 1, 2, 3]}
                        ]
                    },
                )
                assert answer.status_code == 200
    stats = client.get_inference_statistics("twice")["model_stats"]
    by_version = {s["version"]: s for s in stats}
    assert by_version["1"]["inference_stats"]["success"]["count"] == 3
    assert by_version["2"]["inference_stats"]["success"]["count"] == 1
    assert by_version["1"]["execution_count"] == 3 and by_version["2"]["execution_count"] == 1
    # no cache on this model: every success was computed
    assert by_version["1"]["inference_stats"]["cache_hit"]["count"] == 0
    one = client.get_inference_statistics("twice", "2")["model_stats"]
    assert one == [by_version["2"]]

"""POST /predict and friends against a real server on the bundled digits model."""

from __future__ import annotations

import asyncio

import httpx
import numpy as np
import pytest
import torch

from tests.support import MODELS, ServerThread

pytestmark = pytest.mark.slow  # every test here takes a second or more

VALIDATION = np.load(MODELS / "digits" / "validation.npz")


def test_validation_rows_one_per_request_are_at_least_95_percent_right(digits_server):
    x, y = VALIDATION["x"], VALIDATION["y"]

    async def run() -> list[str]:
        async with httpx.AsyncClient(base_url=digits_server.url, timeout=30) as client:
            sem = asyncio.Semaphore(16)

            async def one(row: np.ndarray) -> str:
                async with sem:
                    r = await client.post("/predict", json={"instances": [row.tolist()]})
                    assert r.status_code == 200, r.text
                    return r.json()["labels"][0]

            return await asyncio.gather(*(one(row) for row in x))

    labels = asyncio.run(run())
    accuracy = np.mean([int(label) == int(t) for label, t in zip(labels, y, strict=True)])
    assert len(labels) == len(y) == 450
    assert accuracy >= 0.95


def test_response_matches_a_direct_forward(digits_server):
    rows = VALIDATION["x"][:5]
    r = httpx.post(
        digits_server.url + "/v1/models/digits:predict", json={"instances": rows.tolist()}
    )
    assert r.status_code == 200
    body = r.json()
    assert body["model_name"] == "digits" and body["model_version"] == "1"
    module = torch.jit.load(str(MODELS / "digits" / "1" / "model.pt"))
    with torch.inference_mode():
        expected = module(torch.from_numpy(rows)).numpy()
    np.testing.assert_allclose(np.array(body["predictions"]), expected, rtol=1e-4, atol=1e-4)
    assert body["labels"] == [str(i) for i in expected.argmax(1)]
    assert all(0.0 < p <= 1.0 for p in body["probabilities"])
    assert r.headers["x-request-id"]


def test_version_route_and_status(digits_server):
    row = VALIDATION["x"][0].tolist()
    r = httpx.post(
        digits_server.url + "/v1/models/digits/versions/1:predict", json={"instances": [row]}
    )
    assert r.status_code == 200 and r.json()["model_version"] == "1"
    status = httpx.get(digits_server.url + "/v1/models/digits").json()
    assert status["model_version_status"][0]["state"] == "AVAILABLE"


def test_request_id_is_echoed(digits_server):
    r = httpx.get(digits_server.url + "/health", headers={"X-Request-ID": "abc-123"})
    assert r.headers["x-request-id"] == "abc-123"


def test_probes_and_metrics(digits_server):
    assert httpx.get(digits_server.url + "/health").json() == {"status": "ok"}
    assert httpx.get(digits_server.url + "/health/ready").status_code == 200
    row = VALIDATION["x"][0].tolist()
    httpx.post(digits_server.url + "/predict", json={"instances": [row]})
    text = httpx.get(digits_server.url + "/metrics").text
    assert 'ai_requests_total{model="digits",status="200"}' in text
    assert 'ai_request_latency_seconds_bucket{le="0.001",model="digits"}' in text


@pytest.mark.parametrize("models", [2])
def test_two_apps_in_one_process_do_not_share_metrics(make_settings, models):
    with ServerThread(make_settings()) as a, ServerThread(make_settings()) as b:
        row = VALIDATION["x"][0].tolist()
        httpx.post(a.url + "/predict", json={"instances": [row]})
        assert (
            'ai_requests_total{model="digits",status="200"} 1.0'
            in httpx.get(a.url + "/metrics").text
        )
        assert 'ai_requests_total{model="digits"' not in httpx.get(b.url + "/metrics").text

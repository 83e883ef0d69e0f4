"""Images in, labels out: the bundled digits model through its `[preprocess]` image
processor, over every form a client sends, and hostile images refused while the server
keeps serving."""

from __future__ import annotations

import base64
import os
from pathlib import Path

import httpx
import numpy as np
import pytest
import tritonclient.http as triton

from tests.processors.hostile import animated_gif, animated_png, big_solid_png, png_declaring
from tests.support import MODELS, ServerThread, metric

EXAMPLES = sorted((MODELS / "digits" / "examples").iterdir())
MEDIA = {".png": "image/png", ".jpg": "image/jpeg"}
VALIDATION = np.load(MODELS / "digits" / "validation.npz")


def tensor_of(example: Path) -> list:
    """The example's digit as the model's 8x8 tensor: the first held-out row of its label."""
    row = int(np.flatnonzero(VALIDATION["y"] == int(example.stem))[0])
    return VALIDATION["x"][row].tolist()


@pytest.fixture(scope="module")
def server():
    from torchgate.config import Settings

    settings = Settings(
        models=MODELS, default_model="digits", device="cpu", auth="off", rate_limit="off"
    )
    with ServerThread(settings) as running:
        yield running


@pytest.mark.slow
def test_the_examples_are_answered_right_in_every_form(server):
    assert len(EXAMPLES) >= 4
    with httpx.Client(base_url=server.url) as client:
        for example in EXAMPLES:
            data = example.read_bytes()
            label = example.stem
            raw = client.post(
                "/v1/models/digits:predict",
                content=data,
                headers={"content-type": MEDIA[example.suffix]},
            )
            assert raw.status_code == 200, raw.text
            assert raw.json()["labels"] == [label], example.name
            # the tensor path on the same digit: the same label, nearly the same logits
            tensor = client.post("/predict", json={"instances": [tensor_of(example)]}).json()
            assert tensor["labels"] == [label]
            b64 = base64.b64encode(data).decode()
            answer = client.post("/predict", json={"instances": [{"b64": b64}, b64]})
            assert answer.status_code == 200 and answer.json()["labels"] == [label, label]
            v2 = {
                "inputs": [{"name": "image", "datatype": "BYTES", "shape": [1, 1], "data": [b64]}]
            }
            logits = client.post("/v2/models/digits/infer", json=v2).json()["outputs"][0]["data"]
            assert int(np.argmax(logits)) == int(label)


def test_tritonclient_sends_images_as_binary_bytes(server):
    client = triton.InferenceServerClient(server.url.removeprefix("http://"))
    images = np.array([[p.read_bytes()] for p in EXAMPLES], dtype=object)
    given = triton.InferInput("image", list(images.shape), "BYTES")
    given.set_data_from_numpy(images, binary_data=True)
    result = client.infer("digits", [given])
    labels = result.as_numpy("logits").argmax(axis=1).tolist()
    assert labels == [int(p.stem) for p in EXAMPLES]
    metadata = client.get_model_metadata("digits")
    assert metadata["inputs"][0]["name"] == "input"  # the tensor path stays what it was


HOSTILE = [
    (
        "bomb",
        png_declaring(100_000, 100_000),
        "declares too many pixels, over the limit of 40000000",
        "too_many_pixels",
    ),
    (
        "truncated",
        (MODELS / "digits" / "examples" / "2.jpg").read_bytes()[:900],
        "cannot be decoded",
        "bad_image",
    ),
    ("animated gif", animated_gif(), "not a JPEG, PNG, WEBP image", "bad_image"),
    ("animated png", animated_png(), "animated images are not accepted", "animated"),
    ("random bytes", os.urandom(4096), "not a JPEG, PNG, WEBP image", "bad_image"),
    (
        "too many real pixels",
        big_solid_png(),
        "8000x6000 pixels is over the limit",
        "too_many_pixels",
    ),
]


@pytest.mark.parametrize(
    ("case", "data", "message", "reason"), HOSTILE, ids=[h[0] for h in HOSTILE]
)
def test_hostile_images_are_400s_and_the_server_stays_healthy(server, case, data, message, reason):
    with httpx.Client(base_url=server.url, timeout=30) as client:
        before = metric(
            client.get("/metrics").text,
            "torchgate_preprocess_refusals_total",
            model="digits",
            reason=reason,
        )
        answer = client.post(
            "/v1/models/digits:predict", content=data, headers={"content-type": "image/png"}
        )
        assert answer.status_code == 400, answer.text
        assert message in answer.json()["error"]
        b64 = base64.b64encode(data).decode()
        assert client.post("/predict", json={"instances": [{"b64": b64}]}).status_code == 400
        after = metric(
            client.get("/metrics").text,
            "torchgate_preprocess_refusals_total",
            model="digits",
            reason=reason,
        )
        assert after == before + 2
        assert client.get("/health/ready").status_code == 200
        good = EXAMPLES[0]
        answer = client.post(
            "/predict", content=good.read_bytes(), headers={"content-type": MEDIA[good.suffix]}
        )
        assert answer.status_code == 200 and answer.json()["labels"] == [good.stem]


def test_other_refusals_name_the_problem(server):
    with httpx.Client(base_url=server.url) as client:
        answer = client.post("/predict", json={"instances": [{"b64": "not base64!"}]})
        assert answer.status_code == 400 and "image 0: not valid base64" in answer.json()["error"]
        answer = client.post("/predict", content=b"GIF89a", headers={"content-type": "image/gif"})
        assert answer.status_code == 415
        answer = client.post("/predict", json={"instances": [{"b64": "aGk="}, 5]})
        assert answer.status_code == 400 and "row 1" in answer.json()["error"]

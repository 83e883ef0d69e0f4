"""Every kind of bad input gets its status and `{"error": ...}`, and the server keeps serving."""

from __future__ import annotations

import httpx
import numpy as np
import pytest

from tests.support import MODELS, eventually, metric

pytestmark = pytest.mark.slow  # every test here takes a second or more

GOOD = {"instances": [np.load(MODELS / "digits" / "validation.npz")["x"][0].tolist()]}
ROW = [[[[0.0] * 8 for _ in range(8)]]]  # one row, shape [1, 8, 8]


@pytest.mark.parametrize(
    ("path", "body", "headers", "status", "fragment"),
    [
        (
            "/predict",
            b"this is not json",
            {"content-type": "application/json"},
            400,
            "malformed JSON",
        ),
        ("/predict", b"", {"content-type": "application/json"}, 400, "empty body"),
        ("/predict", b'{"rows": []}', {}, 400, "instances"),
        ("/predict", b'{"instances": {}}', {}, 400, "list of rows"),
        ("/predict", b'{"instances": []}', {}, 400, "at least one row"),
        (
            "/predict",
            b'{"instances": [[1, 2, 3]]}',
            {},
            400,
            "each row must have shape [1, 8, 8] as model.toml declares; the rows sent have "
            "shape [3]",
        ),
        ("/predict", b'{"instances": [[[["a"]]]]}', {}, 400, "expected numbers"),
        ("/predict", b'{"instances": [[[[1, "2"]]]]}', {}, 400, "expected numbers"),
        ("/predict", b'{"instances": [[[[1, 2], [3]]]]}', {}, 400, "one shape"),
        ("/predict", b'{"instances": [[[[NaN]]]]}', {}, 400, "malformed JSON"),
        ("/predict", b'{"instances": [[[[Infinity]]]]}', {}, 400, "malformed JSON"),
        ("/predict", b'{"instances": [[[[1e999]]]]}', {}, 400, "infinity"),
        ("/predict", b'{"instances": [[[[1e39]]]]}', {}, 400, "infinite"),
        ("/predict", b'{"instances": [[[[null]]]]}', {}, 400, "numbers"),
        ("/predict", b"[" * 100_000, {}, 400, "malformed JSON"),
        ("/v1/models/nope:predict", b'{"instances": []}', {}, 404, "unknown model"),
        ("/v1/models/digits/versions/9:predict", b'{"instances": []}', {}, 404, "no version 9"),
        ("/v1/models/digits/versions/x:predict", b'{"instances": []}', {}, 404, "no version"),
        ("/v1/models/..%2F..%2Fetc:predict", b'{"instances": []}', {}, 404, "not found"),
        ("/v1/models/..:predict", b'{"instances": []}', {}, 404, "unknown model"),
        ("/v1/models/.%2E:predict", b'{"instances": []}', {}, 404, "unknown model"),
        ("/predict", b"{}", {"content-type": "text/plain"}, 415, "content type"),
    ],
)
def test_bad_request_then_good_one(digits_server, path, body, headers, status, fragment):
    with httpx.Client(base_url=digits_server.url) as client:
        r = client.post(path, content=body, headers=headers or {"content-type": "application/json"})
        assert r.status_code == status, r.text
        assert r.headers["content-type"] == "application/json"
        error = r.json()["error"]
        assert fragment in error
        assert "Traceback" not in r.text and 'File "' not in r.text and "/src/" not in r.text
        assert client.post("/predict", json=GOOD).status_code == 200


def test_more_rows_than_max_batch_size(digits_server):
    r = httpx.post(digits_server.url + "/predict", json={"instances": ROW * 65})
    assert r.status_code == 400
    assert "at most 64" in r.json()["error"]
    assert (
        httpx.post(digits_server.url + "/predict", json={"instances": ROW * 64}).status_code == 200
    )


def test_unknown_route_and_method_are_json(digits_server):
    r = httpx.get(digits_server.url + "/nowhere")
    assert r.status_code == 404 and r.json() == {"error": "not found"}
    r = httpx.get(digits_server.url + "/predict")
    assert r.status_code == 405 and r.json() == {"error": "method not allowed"}


def test_unknown_model_names_never_become_metric_labels(digits_server):
    for i in range(5):
        httpx.post(digits_server.url + f"/v1/models/evil{i}:predict", json=GOOD)
    text = httpx.get(digits_server.url + "/metrics").text
    assert "evil" not in text
    assert 'ai_requests_total{model="_unknown",status="404"} 5.0' in text


def test_a_client_leaving_mid_body_is_not_logged_as_a_server_error(digits_server, caplog):
    import socket

    def inflight() -> float:  # the scrape counts itself
        text = httpx.get(digits_server.url + "/metrics").text
        return metric(text, "torchgate_inflight_requests")

    sock = socket.create_connection(("127.0.0.1", digits_server.port))
    sock.sendall(
        b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b'Content-Length: 1000\r\n\r\n{"instances":'
    )
    eventually(lambda: inflight() == 2)  # the server is reading its body
    sock.close()
    eventually(lambda: inflight() == 1)  # and has finished with it
    assert not [r for r in caplog.records if r.levelname == "ERROR"]
    assert httpx.post(digits_server.url + "/predict", json=GOOD).status_code == 200

"""Security at the edge, against real servers: keys and scopes, rate limits (in process and
in Redis), body limits and timeouts, content types and encodings."""

from __future__ import annotations

import asyncio
import logging
import select
import socket
import time
import uuid
from pathlib import Path

import httpx
import pytest

from tests.support import (
    MODELS,
    ServerThread,
    metric,
    own_redis,
    redis_up,
    run_cli,
    server_process,
)
from torchgate.keys import key_file_entry

ROW = [[[0.0] * 8 for _ in range(8)]]
GOOD = {"instances": [ROW]}
INFER_KEY = "tg_infer_" + "a" * 40
ADMIN_KEY = "tg_admin_" + "b" * 40


@pytest.fixture
def keys_file(tmp_path: Path) -> Path:
    path = tmp_path / "keys.toml"
    path.write_text(
        key_file_entry("app1", INFER_KEY, ["infer"])
        + key_file_entry("ops", ADMIN_KEY, ["admin", "infer"])
        + key_file_entry("tiny", "tg_tiny_" + "c" * 40, ["infer"], "3/minute")
    )
    return path


@pytest.fixture
def secured(make_settings, keys_file):
    with ServerThread(make_settings(auth="on", api_keys_file=keys_file)) as server:
        yield server


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@pytest.mark.slow
def test_keys_and_scopes(secured):
    url = secured.url + "/predict"
    r = httpx.post(url, json=GOOD)
    assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
    assert r.json() == {"error": "missing API key"}
    assert httpx.post(url, json=GOOD, headers=bearer("tg_wrong")).status_code == 401
    assert httpx.post(url, json=GOOD, headers=bearer(INFER_KEY[:-1])).status_code == 401
    assert httpx.post(url, json=GOOD, headers={"Authorization": INFER_KEY}).status_code == 401
    assert httpx.post(url, json=GOOD, headers=bearer(INFER_KEY)).status_code == 200
    assert httpx.post(url, json=GOOD, headers={"X-API-Key": INFER_KEY}).status_code == 200
    admin = secured.url + "/v2/repository/index"
    r = httpx.post(admin, json={}, headers=bearer(INFER_KEY))
    assert r.status_code == 403 and "admin" in r.json()["error"]
    assert httpx.post(admin, json={}, headers=bearer(ADMIN_KEY)).status_code not in (401, 403)
    for open_path in ("/health", "/health/ready", "/metrics"):
        assert httpx.get(secured.url + open_path).status_code == 200


@pytest.mark.slow
def test_keys_never_reach_logs(secured, caplog):
    caplog.set_level(logging.INFO)
    httpx.post(secured.url + "/predict", json=GOOD, headers=bearer(INFER_KEY))
    httpx.post(secured.url + "/predict", json=GOOD, headers=bearer("tg_wrong_secret"))
    text = caplog.text + "".join(str(r.__dict__) for r in caplog.records)
    assert INFER_KEY not in text and "tg_wrong_secret" not in text
    assert any(getattr(r, "key_name", None) == "app1" for r in caplog.records)


@pytest.mark.slow
def test_metrics_can_require_a_key(make_settings, keys_file):
    settings = make_settings(auth="on", api_keys_file=keys_file, metrics_require_key=True)
    with ServerThread(settings) as server:
        assert httpx.get(server.url + "/metrics").status_code == 401
        assert httpx.get(server.url + "/metrics", headers=bearer(INFER_KEY)).status_code == 200
        assert httpx.get(server.url + "/health/ready").status_code == 200


@pytest.mark.slow
def test_the_101st_request_in_a_minute_is_429(make_settings, keys_file):
    settings = make_settings(auth="on", api_keys_file=keys_file, rate_limit="100/minute")
    with ServerThread(settings) as server, httpx.Client(base_url=server.url) as client:
        for i in range(100):
            r = client.post("/predict", json=GOOD, headers=bearer(INFER_KEY))
            assert r.status_code == 200, i
        assert r.headers["ratelimit-policy"] == '"default";q=100;w=60'
        assert r.headers["ratelimit-limit"] == "100"
        assert r.headers["ratelimit-remaining"] == "0"
        assert r.headers["ratelimit"].startswith('"default";r=0;t=')
        r = client.post("/predict", json=GOOD, headers=bearer(INFER_KEY))
        assert r.status_code == 429
        assert r.headers["retry-after"].isdigit() and 1 <= int(r.headers["retry-after"]) <= 60
        assert r.headers["ratelimit-remaining"] == "0" and "ratelimit-reset" in r.headers
        # another key has its own budget; the per-key override applies; probes are unlimited
        assert client.post("/predict", json=GOOD, headers=bearer(ADMIN_KEY)).status_code == 200
        tiny = bearer("tg_tiny_" + "c" * 40)
        codes = [client.post("/predict", json=GOOD, headers=tiny).status_code for _ in range(4)]
        assert codes == [200, 200, 200, 429]
        assert client.get("/health").status_code == 200
        assert "ratelimit" not in client.get("/health").headers
        text = client.get("/metrics").text
        assert 'torchgate_ratelimit_rejections_total{policy="default"} 1.0' in text


@pytest.mark.slow
def test_the_window_refills(make_settings):
    settings = make_settings(rate_limit="4/second")
    with ServerThread(settings) as server, httpx.Client(base_url=server.url) as client:
        codes = [client.post("/predict", json=GOOD).status_code for _ in range(5)]
        assert codes == [200] * 4 + [429]  # auth off: limited per client address
        time.sleep(2.1)  # pacing: the one-second window passes, twice over
        assert client.post("/predict", json=GOOD).status_code == 200


@pytest.mark.slow
def test_limiter_memory_does_not_grow_with_bad_keys(make_settings, keys_file):
    settings = make_settings(auth="on", api_keys_file=keys_file, rate_limit="100/minute")
    with ServerThread(settings) as server:

        async def spray() -> set[int]:
            async with httpx.AsyncClient(base_url=server.url) as client:
                codes = set()
                for i in range(2000):
                    r = await client.post("/predict", json=GOOD, headers=bearer(f"bad{i}"))
                    codes.add(r.status_code)
                return codes

        assert asyncio.run(spray()) == {401}
        assert len(_limiter_counters(server)) == 0


def _limiter_counters(server: ServerThread):
    stack = server.app.middleware_stack
    while stack is not None:
        limiter = getattr(stack, "limiter", None)
        if limiter is not None:
            return limiter._local
        stack = getattr(stack, "app", None)
    raise AssertionError("no rate limiter in the middleware stack")


@pytest.mark.slow
def test_wrong_content_type_and_encodings(digits_server):
    url = digits_server.url + "/predict"
    r = httpx.post(
        url, content=b"x=1", headers={"content-type": "application/x-www-form-urlencoded"}
    )
    assert r.status_code == 415
    r = httpx.post(
        url,
        content=b"\x1f\x8b",
        headers={"content-type": "application/json", "content-encoding": "gzip"},
    )
    assert r.status_code == 415 and "compressed" in r.json()["error"]


@pytest.mark.slow
def test_declared_oversize_body_is_refused_before_it_is_read(make_settings):
    with ServerThread(make_settings(max_body_bytes=4096)) as server:
        r = httpx.post(
            server.url + "/predict",
            content=b" " * 5000,
            headers={"content-type": "application/json"},
        )
        assert r.status_code == 413 and "4096" in r.json()["error"]
        assert httpx.post(server.url + "/predict", json=GOOD).status_code == 200


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


@pytest.mark.slow
def test_50_mib_chunked_body_is_cut_off_with_413_without_growing_memory(tmp_path):
    with server_process("--models", str(MODELS), "--default-model", "digits", "--no-auth") as (
        proc,
        url,
    ):
        port = int(url.rsplit(":", 1)[1])
        before = _rss_kib(proc.pid)
        sock = socket.create_connection(("127.0.0.1", port))
        sock.sendall(
            b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n"
        )
        chunk = b"%x\r\n%s\r\n" % (1 << 20, b" " * (1 << 20))
        answer = b""
        sent = 0
        try:
            for _ in range(50):
                sock.sendall(chunk)
                sent += 1
                if select.select([sock], [], [], 0.01)[0]:
                    break
            answer = sock.recv(65536)
        except (BrokenPipeError, ConnectionResetError):
            pass
        finally:
            sock.close()
        assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
        assert sent < 50  # refused long before the whole body was sent
        grown_mib = (_rss_kib(proc.pid) - before) / 1024
        assert grown_mib < 20, grown_mib
        assert httpx.post(url + "/predict", json=GOOD).status_code == 200


@pytest.mark.slow
def test_a_trickling_body_is_cut_off_with_408(make_settings):
    with ServerThread(make_settings(body_timeout_s=1.0)) as server:
        sock = socket.create_connection(("127.0.0.1", server.port))
        started = time.monotonic()
        sock.sendall(
            b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b'Content-Length: 1000\r\n\r\n{"instances":'
        )
        sock.settimeout(10)
        answer = sock.recv(65536)
        sock.close()
        assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
        assert time.monotonic() - started < 5
        assert httpx.post(server.url + "/predict", json=GOOD).status_code == 200


def test_serve_refuses_to_start_without_keys(tmp_path):
    result = run_cli("serve", "--models", str(MODELS))
    assert result.returncode != 0
    assert "no API keys configured" in result.stderr and "--no-auth" in result.stderr


@pytest.mark.slow
def test_keys_new_prints_a_key_once_and_its_entry(tmp_path):
    keys_file = tmp_path / "keys.toml"
    result = run_cli(
        "keys", "new", "--name", "app1", "--scope", "admin", "--keys-file", str(keys_file)
    )
    assert result.returncode == 0
    key = result.stdout.split("store it now): ")[1].split()[0]
    assert key.startswith("tg_") and len(key) > 40
    assert key not in keys_file.read_text()
    assert 'name = "app1"' in keys_file.read_text() and '"admin"' in keys_file.read_text()
    with server_process(
        "--models",
        str(MODELS),
        "--default-model",
        "digits",
        env={"TORCHGATE_API_KEYS_FILE": str(keys_file)},
    ) as (_, url):
        assert httpx.post(url + "/predict", json=GOOD, headers=bearer(key)).status_code == 200
        assert httpx.post(url + "/predict", json=GOOD).status_code == 401


# shared limits in Redis ----------------------------------------------------------------------


@pytest.mark.slow
def test_two_servers_sharing_redis_enforce_one_limit(tmp_path):
    assert redis_up(6379), "the tests need Redis on 127.0.0.1:6379 (.ci/run starts it)"
    key = f"tg_shared_{uuid.uuid4().hex}"
    keys_file = tmp_path / "keys.toml"
    keys_file.write_text(key_file_entry(f"shared-{uuid.uuid4().hex[:8]}", key, ["infer"]))
    env = {
        "TORCHGATE_API_KEYS_FILE": str(keys_file),
        "TORCHGATE_RATE_LIMIT": "10/minute",
        "TORCHGATE_REDIS_URL": "redis://127.0.0.1:6379/0",
    }
    args = ("--models", str(MODELS), "--default-model", "digits")
    with server_process(*args, env=env) as (_, a), server_process(*args, env=env) as (_, b):
        codes = []
        for i in range(12):
            url = a if i % 2 == 0 else b
            codes.append(httpx.post(url + "/predict", json=GOOD, headers=bearer(key)).status_code)
        assert codes == [200] * 10 + [429, 429]


@pytest.mark.slow
def test_redis_going_away_fails_open_and_counts_errors(tmp_path, make_settings):
    with own_redis() as (redis, url):
        settings = make_settings(rate_limit="1000/minute", redis_url=url)
        with ServerThread(settings) as server, httpx.Client(base_url=server.url) as client:
            assert client.post("/predict", json=GOOD).status_code == 200
            assert "torchgate_ratelimit_backend_errors_total 0.0" in client.get("/metrics").text
            redis.terminate()
            redis.wait(timeout=10)
            codes = set()
            for _ in range(5):
                codes.add(client.post("/predict", json=GOOD).status_code)
                time.sleep(0.3)  # pacing
            assert codes == {200}
            text = client.get("/metrics").text
            assert metric(text, "torchgate_ratelimit_backend_errors_total") >= 2

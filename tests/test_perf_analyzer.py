"""Triton's perf_analyzer, the binary from the tritonclient 2.40.0 wheel, against torchgate
over HTTP on the digits model at concurrency 1 to 8: it must get its model config and
statistics from torchgate and report throughput and latency, and the server side it
reports (torchgate's statistics) must agree with what the client counted."""

from __future__ import annotations

import re
import secrets
import sys

import pytest

from tests.support import MODELS, ROOT, server_process

sys.path.insert(0, str(ROOT / "scripts"))

import perf_analyzer  # noqa: E402

pytestmark = pytest.mark.slow  # every test here takes a second or more


@pytest.fixture(scope="module")
def tool() -> perf_analyzer.PerfAnalyzer:
    try:
        return perf_analyzer.install()
    except perf_analyzer.Unavailable as exc:
        pytest.skip(f"perf_analyzer cannot be installed here: {exc}")


def test_perf_analyzer_measures_digits_at_concurrency_1_to_8(tool):
    key = "tg_test_" + secrets.token_urlsafe(16)
    env = {"TORCHGATE_API_KEYS": key, "TORCHGATE_CACHE_TTL_S": "0"}
    args = ("--models", str(MODELS), "--default-model", "digits")
    with server_process(*args, env=env, ready_path="/health/ready") as (_, url):
        done, levels = perf_analyzer.measure(
            tool,
            url.removeprefix("http://"),
            key=key,
            concurrency="1:8:1",
            window_ms=500,
            max_trials=20,
            extra=("--stability-percentage", "50"),
        )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert [level.concurrency for level in levels] == list(range(1, 9))
    for level in levels:
        assert level.throughput > 0 and 0 < level.p50_us <= level.p99_us
        assert level.compute_us > 0  # from torchgate's statistics

    # every level's server side, from GET /v2/models/digits/stats, against the client's
    clients = [int(n) for n in re.findall(r"Client: \n    Request count: (\d+)", done.stdout)]
    servers = [int(n) for n in re.findall(r"Successful request count: (\d+)", done.stdout)]
    assert len(clients) == len(servers) == 8, done.stdout
    for client, server in zip(clients, servers, strict=True):
        assert client > 0 and abs(client - server) <= 0.1 * client + 10, (client, server)
    print(done.stdout)

"""The circuit breaker seen through a real server holding two models: a failing model's
circuit opens, refuses at once, probes and closes, on /metrics and /health/ready, while the
other model keeps answering; client errors and shed load never open it."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import numpy as np
import pytest

from tests.support import (
    BREAK,
    MEND,
    QUEUE_WAITS,
    Breakable,
    Doubler,
    ServerThread,
    copy_digits,
    doubler_toml,
    metric,
    slow_row,
    started,
    until_metric,
    until_started,
    write_model,
)
from torchgate.config import Settings
from torchgate.keys import key_file_entry

FLAKY = "/v1/models/flaky:predict"
GOOD = {"instances": [[1.0, 2.0, 3.0, 4.0]]}
POISONED = {"instances": [[666.0, 0.0, 0.0, 0.0]]}
BREAKING = {"instances": [[BREAK, 0.0, 0.0, 0.0]]}
MENDING = {"instances": [[MEND, 0.0, 0.0, 0.0]]}
MALLORY = "tg_mallory_" + "m" * 40
COOLDOWN_S = 1.0
FLAKY_V1 = {"model": "flaky", "version": "1"}


@pytest.fixture
def two_models(tmp_path: Path, make_settings: Callable[..., Settings]):
    def start(**batching: object) -> ServerThread:
        write_model(tmp_path, "flaky", Breakable(), doubler_toml(**batching))
        copy_digits(tmp_path)
        settings = make_settings(
            models=tmp_path, breaker_failures=3, breaker_cooldown_s=COOLDOWN_S, cache_ttl_s=0
        )
        return ServerThread(settings)

    return start


class View:
    """What a client sees of the flaky model's circuit."""

    def __init__(self, client: httpx.Client, digits_body: dict) -> None:
        self.client = client
        self.digits_body = digits_body

    def metrics(self) -> str:
        return self.client.get("/metrics").text

    def state(self) -> float:
        return metric(self.metrics(), "torchgate_circuit_state", model="flaky", version="1")

    def transitions(self) -> dict[str, float]:
        text = self.metrics()
        return {
            to: metric(text, "torchgate_circuit_transitions_total", model="flaky", to=to)
            for to in ("open", "half_open", "closed")
        }

    def ready(self) -> httpx.Response:
        return self.client.get("/health/ready")

    def other_model_answers(self) -> None:
        answer = self.client.post("/v1/models/digits:predict", json=self.digits_body)
        assert answer.status_code == 200, answer.text
        assert self.client.get("/health").status_code == 200
        assert self.client.get("/v2/models/digits/ready").status_code == 200


def _digits_body(tmp_path: Path) -> dict:
    x = np.load(tmp_path / "digits" / "validation.npz")["x"][:1]
    return {"instances": x.tolist()}


@pytest.mark.slow
def test_a_broken_model_opens_probes_and_closes_while_the_pod_stays_ready(
    two_models, tmp_path: Path
) -> None:
    with two_models() as server, httpx.Client(base_url=server.url, timeout=30) as client:
        view = View(client, _digits_body(tmp_path))

        # closed
        assert client.post(FLAKY, json=GOOD).status_code == 200
        assert view.state() == 0 and view.ready().status_code == 200
        view.other_model_answers()

        # closed -> open: the model breaks, and fails on good input (and its probe) three
        # times in a row
        for body in (BREAKING, GOOD):
            answer = client.post(FLAKY, json=body)
            assert answer.status_code == 500 and "error" in answer.json()
            view.other_model_answers()
        sent = time.monotonic()
        assert client.post(FLAKY, json=GOOD).status_code == 500
        opened = time.monotonic()  # the circuit opened between `sent` and now
        forwards = metric(view.metrics(), "torchgate_batch_size_count", model="flaky", version="1")
        refused = client.post(FLAKY, json=GOOD)
        text = view.metrics()
        ready = view.ready()
        model_ready = client.get("/v2/models/flaky/ready")
        assert time.monotonic() - sent < COOLDOWN_S, "too slow to see the open state"
        assert refused.status_code == 503
        assert refused.headers["retry-after"] == "1"
        assert "flaky" in refused.json()["error"]
        assert metric(text, "torchgate_circuit_state", model="flaky", version="1") == 2
        assert metric(text, "torchgate_shed_total", model="flaky", reason="circuit_open") == 1
        # refused without queueing: nothing was computed, nothing waits
        assert metric(text, "torchgate_batch_size_count", model="flaky", version="1") == forwards
        assert metric(text, "torchgate_queue_rows", model="flaky", version="1") == 0
        # the model is unavailable; the pod stays ready, so its other models keep serving
        assert model_ready.status_code == 503 and "circuit" in model_ready.json()["error"]
        assert ready.status_code == 200
        assert client.get("/v2/health/ready").status_code == 200
        assert view.transitions() == {"open": 1, "half_open": 0, "closed": 0}
        view.other_model_answers()
        assert metric(view.metrics(), "torchgate_circuit_state", model="digits", version="1") == 0

        # open -> half-open after the cooldown: /metrics shows it
        time.sleep(max(0.0, opened + COOLDOWN_S + 0.05 - time.monotonic()))  # pacing
        assert view.state() == 1
        assert client.get("/v2/models/flaky/ready").status_code == 200
        assert view.transitions() == {"open": 1, "half_open": 1, "closed": 0}
        view.other_model_answers()

        # a failed probe re-opens for another cooldown
        sent = time.monotonic()
        assert client.post(FLAKY, json=GOOD).status_code == 500
        reopened = time.monotonic()
        refused = client.post(FLAKY, json=GOOD)
        state = view.state()
        assert time.monotonic() - sent < COOLDOWN_S, "too slow to see the open state"
        assert refused.status_code == 503 and state == 2 and view.ready().status_code == 200
        view.other_model_answers()
        time.sleep(max(0.0, reopened + COOLDOWN_S + 0.05 - time.monotonic()))  # pacing

        # half-open -> closed: a good probe (this one mends the model)
        answer = client.post(FLAKY, json=MENDING)
        assert answer.status_code == 200
        assert answer.json()["predictions"] == [[2 * MEND, 0.0, 0.0, 0.0]]
        assert view.state() == 0
        assert view.transitions() == {"open": 2, "half_open": 2, "closed": 1}
        for _ in range(3):
            assert client.post(FLAKY, json=GOOD).status_code == 200
        view.other_model_answers()
        assert client.get("/health").status_code == 200


def test_lone_poisoned_requests_never_open_the_circuit(tmp_path: Path, make_settings) -> None:
    """The attack of the security review: one infer key sends requests whose rows make the
    model raise, each alone in its batch. They fail (500), and that is all: the circuit
    stays closed, the pod ready, and the model serves good requests."""
    write_model(tmp_path, "flaky", Breakable(), doubler_toml())
    keys = tmp_path / "keys.toml"
    keys.write_text(key_file_entry("mallory", MALLORY, ["infer"]))
    settings = make_settings(models=tmp_path, auth="on", api_keys_file=keys, cache_ttl_s=0)
    with ServerThread(settings) as server, httpx.Client(base_url=server.url) as client:
        headers = {"Authorization": f"Bearer {MALLORY}"}
        for _ in range(10):
            answer = client.post(FLAKY, json=POISONED, headers=headers)
            assert answer.status_code == 500
        text = client.get("/metrics").text
        assert metric(text, "torchgate_circuit_state", model="flaky", version="1") == 0
        assert client.get("/health/ready").status_code == 200
        assert client.get("/v2/models/flaky/ready", headers=headers).status_code == 200
        answer = client.post(FLAKY, json=GOOD, headers=headers)
        assert answer.status_code == 200 and answer.json()["predictions"] == [[2.0, 4.0, 6.0, 8.0]]


def test_poisoned_requests_from_several_callers_count(tmp_path: Path, make_settings) -> None:
    """Failures of the input's kind from three distinct keys say something about the model:
    once three keys have had them, they count, and the third failure that counts opens it."""
    write_model(tmp_path, "flaky", Breakable(), doubler_toml())
    callers = {name: f"tg_{name}_" + "k" * 40 for name in ("ann", "bob", "cid")}
    keys = tmp_path / "keys.toml"
    keys.write_text("".join(key_file_entry(n, k, ["infer"]) for n, k in callers.items()))
    settings = make_settings(
        models=tmp_path, auth="on", api_keys_file=keys, cache_ttl_s=0, breaker_failures=3
    )
    with ServerThread(settings) as server, httpx.Client(base_url=server.url) as client:
        states = []
        for key in [*callers.values(), *callers.values()][:5]:
            answer = client.post(FLAKY, json=POISONED, headers={"X-API-Key": key})
            assert answer.status_code == 500
            text = client.get("/metrics").text
            states.append(metric(text, "torchgate_circuit_state", model="flaky", version="1"))
        # ann, bob: one caller each, no count; cid, ann, bob: three counted failures
        assert states == [0, 0, 0, 0, 2]
        assert client.get("/health/ready").status_code == 200


@pytest.mark.slow
def test_client_errors_and_shed_load_never_open_the_circuit(two_models, tmp_path: Path) -> None:
    with two_models(max_queue_rows=2) as server, httpx.Client(base_url=server.url) as client:
        view = View(client, _digits_body(tmp_path))
        bad = [
            {"instances": [[1.0, 2.0]]},  # wrong shape
            {"instances": [[1.0, 2.0, "x", 4.0]]},
            {"rows": []},
            {"instances": []},
        ]
        for _ in range(2):
            for body in bad:
                assert client.post(FLAKY, json=body).status_code == 400
        assert (
            client.post(
                FLAKY, content=b"{", headers={"content-type": "application/json"}
            ).status_code
            == 400
        )

        shed = asyncio.run(_shed_five(server.url))
        assert [a.status_code for a in shed] == [503] * 5
        text = view.metrics()
        assert metric(text, "torchgate_shed_total", model="flaky", reason="queue_full") == 5
        assert view.state() == 0

        # the count is still zero: two model failures do not open it, the third does
        for body in (BREAKING, GOOD):
            assert client.post(FLAKY, json=body).status_code == 500
        assert view.state() == 0 and view.ready().status_code == 200
        assert client.post(FLAKY, json=GOOD).status_code == 500
        assert view.state() == 2
        view.other_model_answers()


async def _shed_five(url: str) -> list[httpx.Response]:
    """Hold the runner with a slow row, fill the queue (two rows), then send five more."""
    limits = httpx.Limits(max_connections=10)
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as c:
        held = asyncio.create_task(c.post(FLAKY, json={"instances": [slow_row(20)]}))
        await until_metric(c, QUEUE_WAITS, lambda n: n == 1, **FLAKY_V1)  # the runner took it
        queued = [
            asyncio.create_task(c.post(FLAKY, json={"instances": [[float(i), 0.0, 0.0, 0.0]]}))
            for i in range(2)
        ]
        await until_metric(c, "torchgate_queue_rows", lambda n: n == 2, **FLAKY_V1)
        shed = [await c.post(FLAKY, json=GOOD) for _ in range(5)]
        answers = await asyncio.gather(held, *queued)
        assert [a.status_code for a in answers] == [200] * 3, "the held runner finished too soon"
        return shed


@pytest.mark.slow
def test_a_poisoned_input_among_healthy_neighbours_does_not_open_the_circuit(
    tmp_path, make_settings
):
    write_model(tmp_path, "flaky", Doubler(), doubler_toml())
    settings = make_settings(models=tmp_path, breaker_failures=2, cache_ttl_s=0)
    with ServerThread(settings) as server:

        async def round_with_poison() -> list[int]:
            async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:
                path = "/v1/models/flaky:predict"
                before = await started(client, "flaky")
                held = asyncio.create_task(client.post(path, json={"instances": [slow_row(8)]}))
                await until_started(client, "flaky", before + 1)  # it holds the runner
                bodies = [{"instances": [[float(i), 0, 0, 0]]} for i in range(6)]
                bodies[3] = {"instances": [[666.0, 0, 0, 0]]}
                answers = await asyncio.gather(*(client.post(path, json=b) for b in bodies))
                await held
                return [a.status_code for a in answers]

        for _ in range(3):
            assert asyncio.run(round_with_poison()) == [200, 200, 200, 500, 200, 200]
        text = httpx.get(server.url + "/metrics").text
        assert metric(text, "torchgate_circuit_state", model="flaky", version="1") == 0
        assert metric(text, "torchgate_batch_retries_total", model="flaky", version="1") == 3
        assert httpx.get(server.url + "/health/ready").status_code == 200

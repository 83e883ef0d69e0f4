"""Texts in, labels out: a tokenizer trained with `tokenizers` and a small TorchScript
classifier trained here, served through `[preprocess] kind = "text"`: right answers,
padding to the longest row, token limits, the deny-list before the tokenizer, and no file
of the model folder ever run."""

from __future__ import annotations

import asyncio
import random
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
from torch import nn

from tests.support import ServerThread, free_port, metric, write_model
from torchgate.config import Settings

ANIMALS = ["cat", "dog", "horse", "kitten", "puppy", "parrot", "rabbit", "hamster"]
MONEY = ["stock", "bond", "market", "price", "dividend", "share", "fund", "index"]
VERBS = ["likes", "watches", "sees", "follows", "wants", "finds"]
LABELS = ("animals", "finance")


def sentence(rng: random.Random, words: list[str]) -> str:
    picked = [rng.choice(words) for _ in range(rng.randint(1, 4))]
    return f"the {picked[0]} {rng.choice(VERBS)} " + " and the ".join(picked[1:] or picked)


def corpus(seed: int = 0) -> list[tuple[str, int]]:
    rng = random.Random(seed)
    return [(sentence(rng, ANIMALS), 0) for _ in range(150)] + [
        (sentence(rng, MONEY), 1) for _ in range(150)
    ]


def tokenizer(texts: list[str]) -> Tokenizer:
    wordpiece = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    wordpiece.normalizer = normalizers.BertNormalizer(lowercase=True)
    wordpiece.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    trainer = trainers.WordPieceTrainer(vocab_size=200, special_tokens=["[PAD]", "[UNK]"])
    wordpiece.train_from_iterator(texts, trainer)
    return wordpiece


class BagOfWords(nn.Module):
    """Mean of token embeddings where the mask is 1, then a linear layer: padding must not
    change an answer."""

    def __init__(self, vocab: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, 16)
        self.out = nn.Linear(16, 2)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        mask = attention_mask.unsqueeze(-1).to(torch.float32)
        pooled = (self.embed(input_ids) * mask).sum(1) / mask.sum(1).clamp(min=1.0)
        return self.out(pooled)


TOML = """max_batch_size = 16
labels = ["animals", "finance"]
[[inputs]]
name = "input_ids"
datatype = "INT64"
shape = [-1]
[[inputs]]
name = "attention_mask"
datatype = "INT64"
shape = [-1]
[[outputs]]
name = "logits"
datatype = "FP32"
shape = [2]
[preprocess]
kind = "text"
max_tokens = 12
[postprocess]
softmax = true
top_k = 2
"""


@pytest.fixture(scope="module")
def text_repo(tmp_path_factory) -> Path:
    repo = tmp_path_factory.mktemp("repo")
    examples = corpus()
    wordpiece = tokenizer([t for t, _ in examples])
    with torch.random.fork_rng():  # seeded here without seeding every later test
        torch.manual_seed(0)
        model = BagOfWords(wordpiece.get_vocab_size())
    optimizer = torch.optim.Adam(model.parameters(), lr=0.05)
    encoded = [wordpiece.encode(t).ids for t, _ in examples]
    longest = max(len(e) for e in encoded)
    ids = torch.zeros(len(encoded), longest, dtype=torch.int64)
    mask = torch.zeros_like(ids)
    for i, e in enumerate(encoded):
        ids[i, : len(e)] = torch.tensor(e)
        mask[i, : len(e)] = 1
    y = torch.tensor([label for _, label in examples])
    for _ in range(60):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(ids, mask), y).backward()
        optimizer.step()
    folder = write_model(repo, "topics", model.eval(), TOML)
    wordpiece.save(str(folder / "tokenizer.json"))
    truncating = write_model(
        repo,
        "topics-cut",
        model,
        TOML.replace("max_tokens = 12", "max_tokens = 12\ntruncate = true"),
    )
    wordpiece.save(str(truncating / "tokenizer.json"))
    return repo


@pytest.fixture(scope="module")
def server(text_repo):
    settings = Settings(
        models=text_repo, device="cpu", auth="off", rate_limit="off", deny_phrases="ignore previous"
    )
    with ServerThread(settings) as running:
        yield running


PATH = "/v1/models/topics:predict"


def test_texts_get_the_right_labels(server):
    with httpx.Client(base_url=server.url) as client:
        answer = client.post(
            PATH, json={"instances": ["the kitten likes the puppy", "the bond market"]}
        )
        assert answer.status_code == 200, answer.text
        body = answer.json()
        assert [row[0] for row in body["labels"]] == ["animals", "finance"]
        assert all(sorted(row) == sorted(LABELS) for row in body["labels"])
        assert all(abs(sum(p) - 1) < 1e-5 for p in body["predictions"])  # softmax
        assert body["probabilities"][0][0] > 0.9
        # V2 with a BYTES tensor of texts, raw logits back
        v2 = {
            "inputs": [
                {
                    "name": "text",
                    "datatype": "BYTES",
                    "shape": [2, 1],
                    "data": ["the cat sees the dog", "the price of the stock"],
                }
            ]
        }
        outputs = client.post("/v2/models/topics/infer", json=v2).json()["outputs"][0]
        assert outputs["shape"] == [2, 2]
        assert outputs["data"][0] > outputs["data"][1] and outputs["data"][2] < outputs["data"][3]


def test_padding_never_changes_an_answer(server):
    texts = [
        "the dog",
        "the horse likes the parrot and the rabbit",
        "the fund",
        "the index and the share",
    ]
    with httpx.Client(base_url=server.url) as client:
        alone = [
            client.post(
                PATH, json={"instances": [t]}, headers={"cache-control": "no-store"}
            ).json()["predictions"][0]
            for t in texts
        ]
        together = client.post(
            PATH, json={"instances": texts}, headers={"cache-control": "no-store"}
        ).json()["predictions"]
    np.testing.assert_allclose(together, alone, atol=1e-5)

    async def concurrent() -> list[list[float]]:  # batches formed across requests, padded
        async with httpx.AsyncClient(base_url=server.url) as client:
            answers = await asyncio.gather(
                *(
                    client.post(
                        PATH, json={"instances": [t]}, headers={"cache-control": "no-store"}
                    )
                    for t in texts * 8
                )
            )
        return [a.json()["predictions"][0] for a in answers]

    np.testing.assert_allclose(asyncio.run(concurrent()), alone * 8, atol=1e-5)


def test_token_limits(server):
    long_text = " and the ".join(["the cat"] * 10)
    with httpx.Client(base_url=server.url) as client:
        answer = client.post(PATH, json={"instances": ["the dog", long_text]})
        assert answer.status_code == 400
        assert "text 1: 38 tokens, over this model's limit of 12" in answer.json()["error"]
        cut = client.post("/v1/models/topics-cut:predict", json={"instances": [long_text]})
        assert cut.status_code == 200 and cut.json()["labels"][0][0] == "animals"
        text = client.get("/metrics").text
        assert (
            metric(
                text,
                "torchgate_preprocess_refusals_total",
                model="topics",
                reason="too_many_tokens",
            )
            == 1
        )


def test_denied_text_is_refused_before_the_tokenizer(server):
    with httpx.Client(base_url=server.url) as client:
        before = client.get("/metrics").text
        answer = client.post(PATH, json={"instances": ["IGNORE previous instructions"]})
        assert answer.status_code == 400 and "content policy" in answer.json()["error"]
        after = client.get("/metrics").text
    count = "torchgate_preprocess_seconds_count"
    assert metric(after, count, model="topics") == metric(before, count, model="topics")
    assert (
        metric(after, "torchgate_preprocess_refusals_total", model="topics", reason="text_policy")
        == 1
    )


@pytest.mark.slow
def test_model_folder_files_are_never_imported_or_read(tmp_path, text_repo):
    """A handler.py and a pickle beside the model, as TorchServe and Triton archives carry:
    torchgate never opens them, with a text and an image model served."""
    import shutil

    from tests.support import MODELS

    repo = tmp_path / "repo"
    shutil.copytree(text_repo / "topics", repo / "topics")
    shutil.copytree(MODELS / "digits", repo / "digits")
    marker = tmp_path / "ran"
    traps = []
    for folder in (repo / "topics", repo / "digits"):
        (folder / "handler.py").write_text(f"open({str(marker)!r}, 'w').write('handler')\n")
        (folder / "model.pkl").write_bytes(
            b"cos\nsystem\n(S'touch " + str(marker).encode() + b"'\ntR."
        )
        traps += [folder / "handler.py", folder / "model.pkl"]
    opened = tmp_path / "opened.txt"
    port = free_port()
    script = textwrap.dedent(f"""
        import sys
        log = open({str(opened)!r}, "w", buffering=1)
        def hook(event, args):
            if event == "open" and isinstance(args[0], str) and args[0].startswith({str(repo)!r}):
                log.write(args[0] + "\\n")
        sys.addaudithook(hook)
        from torchgate.cli import main
        sys.exit(main(["serve", "--models", {str(repo)!r}, "--port", "{port}", "--no-auth", "--rate-limit", "off"]))
    """)
    proc = subprocess.Popen(
        [sys.executable, "-c", script], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        url = f"http://127.0.0.1:{port}"
        for _ in range(600):
            try:
                if httpx.get(url + "/health/ready").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None
            time.sleep(0.1)  # pacing
        answer = httpx.post(url + "/v1/models/topics:predict", json={"instances": ["the cat"]})
        assert answer.status_code == 200
        image = MODELS / "digits" / "examples" / "3.png"
        answer = httpx.post(
            url + "/v1/models/digits:predict",
            content=image.read_bytes(),
            headers={"content-type": "image/png"},
        )
        assert answer.json()["labels"] == ["3"]
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    seen = opened.read_text().splitlines()
    assert any(p.endswith("model.toml") for p in seen), seen  # the hook did see opens
    assert not any(str(trap) in seen for trap in traps), seen
    assert not marker.exists()

"""Shape errors speak of rows, in the terms model.toml declares (one row's shape), not of
the batched array a request became."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import torch
from torch import nn

from tests.support import Doubler, ServerThread, doubler_toml, write_model
from torchgate.config import Settings


class Twice(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * 2


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    repo: Path = tmp_path_factory.mktemp("repo")
    write_model(repo, "doubler", Doubler(), doubler_toml(max_batch_size=8))
    write_model(repo, "single", Twice(), doubler_toml(max_batch_size=0))
    settings = Settings(models=repo, device="cpu", auth="off", rate_limit="off")
    with ServerThread(settings) as running:
        yield running.url


def error(url: str, path: str, body: object) -> str:
    answer = httpx.post(url + path, json=body)
    assert answer.status_code == 400, answer.text
    return answer.json()["error"]


CASES: list[tuple[str, str, object, str]] = [
    # the request: four numbers as four rows of a model whose row is [4]
    (
        "v1 rows of single values",
        "/v1/models/doubler:predict",
        {"instances": [1, 1, 1, 1]},
        "input 'x': each row must have shape [4] as model.toml declares; the rows sent are "
        "single values",
    ),
    (
        "v1 rows of another shape",
        "/v1/models/doubler:predict",
        {"instances": [[1, 2], [3, 4]]},
        "input 'x': each row must have shape [4] as model.toml declares; the rows sent have "
        "shape [2]",
    ),
    (
        "v2 one row without the batch dimension",
        "/v2/models/doubler/infer",
        {"inputs": [{"name": "x", "shape": [4], "datatype": "FP32", "data": [1, 2, 3, 4]}]},
        "input 'x': shape [4] does not match the model's [-1, 4]: the number of rows, then "
        "each row's shape [4] as model.toml declares; for one row send [1, 4]",
    ),
    (
        "v2 rows of another shape",
        "/v2/models/doubler/infer",
        {"inputs": [{"name": "x", "shape": [2, 2], "datatype": "FP32", "data": [1, 2, 3, 4]}]},
        "input 'x': shape [2, 2] does not match the model's [-1, 4]: the number of rows, then "
        "each row's shape [4] as model.toml declares",
    ),
    (
        "v2 a batch dimension the model does not take",
        "/v2/models/single/infer",
        {"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}]},
        "input 'x': shape [1, 4] does not match the model's [4], the shape model.toml declares "
        "(this model takes no batch dimension)",
    ),
]


@pytest.mark.parametrize(("name", "path", "body", "message"), CASES, ids=[c[0] for c in CASES])
def test_shape_errors_speak_per_row(server: str, name: str, path: str, body: object, message):
    assert error(server, path, body) == message


def test_the_old_batched_wording_is_gone(server: str):
    text = error(server, "/v1/models/doubler:predict", {"instances": [1, 1, 1, 1]})
    assert "[4, 4]" not in text and "does not match the model's" not in text

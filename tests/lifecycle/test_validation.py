"""The accuracy gate on the bundled digits model and on broken versions of it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from tests.support import copy_digits
from torchgate.lifecycle.validation import (
    ValidationError,
    ValidationSet,
    baseline_version,
    evaluate,
    gate,
)
from torchgate.serving.model_config import ModelConfig, ValidationConfig
from torchgate.serving.repository import ModelRepository

BOUNDS = ValidationConfig()


class Constant(nn.Module):
    """Always class 3, whatever the input."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = torch.zeros(x.shape[0], 10)
        logits[:, 3] = 1.0
        return logits


class FailsOnRealInput(nn.Module):
    """Passes the start-up check on zeros, raises on anything else."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if bool((x != 0).any()):
            raise RuntimeError("broken")
        return torch.zeros(x.shape[0], 10)


def add_version(folder: Path, version: int, module: nn.Module) -> None:
    (folder / str(version)).mkdir()
    torch.jit.script(module).save(str(folder / str(version) / "model.pt"))


@pytest.fixture
def digits(tmp_path: Path) -> tuple[ModelRepository, ModelConfig, Path]:
    folder = copy_digits(tmp_path)
    add_version(folder, 2, Constant())
    add_version(folder, 3, FailsOnRealInput())
    repository = ModelRepository(tmp_path, "cpu")
    return repository, repository.read_config("digits"), folder


def load(digits, version: int):
    repository, config, _ = digits
    return repository.load_version("digits", version, config)


def test_the_bundled_model_passes_with_a_full_report(digits):
    _, config, folder = digits
    data = ValidationSet.read(folder, config)
    assert data is not None and len(data) == 450
    result = gate(load(digits, 1), data, BOUNDS)
    assert result.passed and result.summary == "version 1 passed the accuracy gate"
    evaluation = result.evaluation
    assert evaluation.accuracy >= 0.95 and evaluation.rows == 450
    assert sorted(evaluation.recall) == [str(i) for i in range(10)]
    assert all(0.8 <= r <= 1 for r in evaluation.recall.values())
    assert evaluation.ms_per_row > 0
    assert evaluation.model_bytes == 153_128  # as ai_model_load_bytes reports it


def test_constant_logits_fail_on_accuracy(digits):
    _, config, folder = digits
    result = gate(load(digits, 2), ValidationSet.read(folder, config), BOUNDS)
    assert not result.passed
    assert result.evaluation.accuracy == pytest.approx(0.1, abs=0.01)
    assert result.evaluation.recall["3"] == 1.0 and result.evaluation.recall["4"] == 0.0
    assert "accuracy 0.1" in result.summary and "under 0.95" in result.summary


def test_a_drop_below_the_baseline_fails_even_above_the_floor(digits):
    _, config, folder = digits
    data = ValidationSet.read(folder, config)
    lenient = ValidationConfig(min_accuracy=0.0, max_drop=0.01)
    worse = gate(load(digits, 2), data, lenient, baseline=load(digits, 1))
    assert not worse.passed and worse.baseline.version == 1
    assert "below version 1's 0.98" in worse.problems[0]
    better = gate(load(digits, 1), data, lenient, baseline=load(digits, 2))
    assert better.passed and better.baseline.accuracy < better.evaluation.accuracy


def test_a_version_whose_forward_fails_fails_the_gate(digits):
    _, config, folder = digits
    result = gate(load(digits, 3), ValidationSet.read(folder, config), BOUNDS)
    assert not result.passed and result.evaluation is None
    assert "forward failed on the validation rows" in result.problems[0]


def test_batches_never_exceed_max_batch_size(digits):
    _, config, folder = digits
    model = load(digits, 1)
    seen: list[int] = []
    forward = model.forward

    class Spy:
        def __getattr__(self, name: str):
            return getattr(model, name)

        def forward(self, inputs, instance=0):
            seen.append(len(inputs[0]))
            return forward(inputs, instance)

    evaluate(Spy(), ValidationSet.read(folder, config))  # type: ignore[arg-type]
    assert max(seen) == config.max_batch_size and sum(seen) == 450


def test_validation_set_problems(digits, tmp_path: Path):
    _, config, folder = digits
    (folder / "validation.npz").unlink()
    assert ValidationSet.read(folder, config) is None
    np.savez(folder / "validation.npz", x=np.zeros((4, 1, 8, 8)))
    with pytest.raises(ValidationError, match="no array 'y'"):
        ValidationSet.read(folder, config)
    np.savez(folder / "validation.npz", x=np.zeros((4, 64)), y=np.zeros(4))
    with pytest.raises(
        ValidationError, match=r"has shape \[4, 64\], the model takes \[4, 1, 8, 8\]"
    ):
        ValidationSet.read(folder, config)
    (folder / "validation.npz").write_bytes(b"not a zip")
    with pytest.raises(ValidationError, match="not a readable"):
        ValidationSet.read(folder, config)


def test_the_baseline_is_the_default_version(digits):
    _, config, _ = digits
    assert baseline_version(config, [1, 2, 3], 3) == 2  # latest other than the candidate
    assert baseline_version(config, [1], 1) is None
    pinned = config.model_copy(update={"default_version": 2})
    assert baseline_version(pinned, [1, 2, 3], 3) == 2
    assert baseline_version(pinned, [1, 2, 3], 2) is None  # the default itself

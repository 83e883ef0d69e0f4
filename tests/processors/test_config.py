"""`[preprocess]` and `[postprocess]` checked at load: one line naming the file, the key
and the problem, every problem listed."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from tests.support import MODELS
from torchgate.errors import ModelLoadError
from torchgate.processors.config import PostprocessConfig
from torchgate.processors.post import Postprocessor
from torchgate.serving.repository import ModelRepository

BASE = (MODELS / "digits" / "model.toml").read_text()


@pytest.mark.parametrize(
    ("old", "new", "problem"),
    [
        (
            'kind = "image"',
            'kind = "video"',
            "preprocess: kind must be one of image, text, not 'video'",
        ),
        ("invert = true", "invert = true\nsharpen = 2", "preprocess.sharpen: unknown key"),
        ("size = [8, 8]", "size = [8, 8, 3]", "preprocess.size: needs at most 2 items, not 3"),
        (
            "size = [8, 8]",
            "size = [16, 16]",
            "preprocess makes CHW tensors of shape [1, 16, 16] (channels L, size [16, 16]); input 'input' declares [1, 8, 8]",
        ),
        (
            'layout = "CHW"',
            'layout = "CHW"\nmean = [1, 2]',
            "preprocess: mean needs 1 value for channels L",
        ),
        ("scale = 0.0627450980392157", "scale = 0", "preprocess.scale: must be over 0"),
        (
            'resize = "fit"',
            'resize = "squash"',
            "preprocess.resize: must be 'stretch', 'fit' or 'cover'",
        ),
        (
            'layout = "CHW"\n',
            'layout = "CHW"\n[postprocess]\ntop_k = 11\n',
            "postprocess.top_k is over the 10 labels",
        ),
        (
            "max_batch_size = 64",
            'max_batch_size = -1\nprecision = "fp8"',
            "max_batch_size: must be at least 0; precision: must be 'fp32', 'fp16' or 'bf16'",
        ),
    ],
)
def test_a_wrong_key_or_value_stops_the_load_with_one_line(tmp_path: Path, old, new, problem):
    shutil.copytree(MODELS / "digits", tmp_path / "digits")
    assert old in BASE
    (tmp_path / "digits" / "model.toml").write_text(BASE.replace(old, new, 1))
    with pytest.raises(ModelLoadError) as error:
        ModelRepository(tmp_path, "cpu").load("digits")
    assert str(error.value.path).endswith("digits/model.toml")
    assert error.value.problem == problem
    assert "\n" not in str(error.value) and "Value error" not in str(error.value)


def test_a_missing_or_broken_tokenizer_is_named(tmp_path: Path):
    from tests.api.test_text_processor import TOML  # a text model's model.toml

    folder = tmp_path / "topics"
    shutil.copytree(MODELS / "digits" / "1", folder / "1")
    (folder / "model.toml").write_text(TOML)
    with pytest.raises(ModelLoadError) as error:
        ModelRepository(tmp_path, "cpu").load("topics")
    assert (
        str(error.value.path).endswith("topics/tokenizer.json")
        and "no such file" in error.value.problem
    )
    (folder / "tokenizer.json").write_text('{"not": "a tokenizer"}')
    with pytest.raises(ModelLoadError) as error:
        ModelRepository(tmp_path, "cpu").load("topics")
    assert "not a tokenizers tokenizer.json" in error.value.problem
    (folder / "model.toml").write_text(
        TOML.replace('kind = "text"', 'kind = "text"\ntokenizer = "../x.json"')
    )
    with pytest.raises(ModelLoadError) as error:
        ModelRepository(tmp_path, "cpu").load("topics")
    assert (
        "preprocess.tokenizer: tokenizer is the name of a file beside model.toml"
        in error.value.problem
    )


def test_postprocessors():
    labels = ("a", "b", "c")
    logits = np.array([[1.0, 3.0, 2.0], [0.0, 0.0, 5.0]], dtype=np.float32)
    top = Postprocessor(PostprocessConfig(top_k=2), labels).top(logits)
    assert top["labels"] == [["b", "c"], ["c", "a"]]
    assert top["probabilities"][0][0] == pytest.approx(np.exp(3) / np.exp([1, 3, 2]).sum())
    soft = Postprocessor(PostprocessConfig(softmax=True), labels).predictions(logits)
    np.testing.assert_allclose(soft.sum(axis=1), [1, 1], rtol=1e-6)
    unit = Postprocessor(PostprocessConfig(l2_normalize=True), None).predictions(logits)
    np.testing.assert_allclose(np.linalg.norm(unit, axis=1), [1, 1], rtol=1e-6)
    with pytest.raises(ValueError, match="l2_normalize"):
        PostprocessConfig(l2_normalize=True, top_k=1)

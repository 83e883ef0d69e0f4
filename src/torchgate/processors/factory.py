"""Building a model's processors from its `model.toml`, and a sample each can prepare."""

from __future__ import annotations

import io
from pathlib import Path

from PIL import Image

from torchgate.problems import first_line
from torchgate.processors.config import ImagePreprocess, TextPreprocess
from torchgate.processors.image import ImageProcessor
from torchgate.processors.post import Postprocessor
from torchgate.processors.text import TextProcessor
from torchgate.serving.model_config import ModelConfig

Preprocessor = ImageProcessor | TextProcessor

# the ceiling on tokens for every model (TORCHGATE_MAX_TOKENS), the source article's
MAX_TOKENS = 10_000


class ProcessorError(Exception):
    """The processors cannot be built; the message names the problem."""

    def __init__(self, path: Path, problem: str) -> None:
        super().__init__(problem)
        self.path = path
        self.problem = problem


def build_preprocessor(
    config: ModelConfig, folder: Path, *, max_tokens: int = MAX_TOKENS
) -> Preprocessor | None:
    """The model's preprocessor; `folder` is the model's folder (for its tokenizer)."""
    pre = config.preprocess
    inputs = config.inputs
    if isinstance(pre, ImagePreprocess):
        return ImageProcessor(pre, inputs[0].datatype)
    if isinstance(pre, TextPreprocess):
        path = folder / pre.tokenizer
        if not path.is_file():
            raise ProcessorError(path, "no such file: preprocess.tokenizer names a file here")
        try:
            return TextProcessor(
                pre,
                path,
                {s.name: s.datatype for s in inputs},
                [s.name for s in inputs],
                max_tokens=max_tokens,
            )
        except Exception as exc:  # tokenizers raises its own Exception subclasses
            first = first_line(exc, empty=repr(exc))
            raise ProcessorError(path, f"not a tokenizers tokenizer.json ({first})") from None
    return None


def build_postprocessor(config: ModelConfig) -> Postprocessor | None:
    if config.postprocess is None:
        return None
    return Postprocessor(config.postprocess, config.labels)


def sample(pre: Preprocessor) -> list[object]:
    """One item the preprocessor must accept: a blank image or a short text."""
    if isinstance(pre, ImageProcessor):
        buffer = io.BytesIO()
        Image.new("RGB", (32, 32), (255, 255, 255)).save(buffer, pre.config.formats[0])
        return [buffer.getvalue()]
    return ["hello world"]

"""The schema of `[preprocess]` and `[postprocess]` in `model.toml`."""

from __future__ import annotations

import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

FILE_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")  # a file beside model.toml, no path


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ImagePreprocess(_Strict):
    """Encoded images (JPEG, PNG, WebP) in; one float tensor per image out."""

    kind: Literal["image"]
    name: str = Field("image", min_length=1, max_length=128, description="the request's input")
    input: str | None = Field(None, description="the model input it feeds; default: the only one")
    channels: Literal["L", "RGB"] = "RGB"
    size: tuple[int, int] = Field(description="[height, width] of the tensor")
    resize: Literal["stretch", "fit", "cover"] = "cover"
    resample: Literal["nearest", "box", "bilinear", "bicubic", "lanczos"] = "bilinear"
    invert: bool = False
    trim: bool = False
    scale: float = Field(1 / 255, gt=0)
    mean: tuple[float, ...] = (0.0,)
    std: tuple[float, ...] = (1.0,)
    layout: Literal["CHW", "HWC"] = "CHW"
    max_pixels: int = Field(40_000_000, ge=1, le=100_000_000)
    formats: tuple[Literal["JPEG", "PNG", "WEBP"], ...] = ("JPEG", "PNG", "WEBP")

    @field_validator("size")
    @classmethod
    def _size(cls, value: tuple[int, int]) -> tuple[int, int]:
        if not all(1 <= d <= 4096 for d in value):
            raise ValueError("size is [height, width], each between 1 and 4096")
        return value

    @model_validator(mode="after")
    def _per_channel(self) -> ImagePreprocess:
        count = 1 if self.channels == "L" else 3
        for key in ("mean", "std"):
            if len(getattr(self, key)) not in (1, count):
                wanted = "1 value" if count == 1 else f"1 or {count} values"
                raise ValueError(f"{key} needs {wanted} for channels {self.channels}")
        if any(s == 0 for s in self.std):
            raise ValueError("std values must not be 0")
        if not self.formats:
            raise ValueError("formats must name at least one of JPEG, PNG, WEBP")
        return self

    @property
    def channel_count(self) -> int:
        return 1 if self.channels == "L" else 3

    def tensor_shape(self) -> tuple[int, int, int]:
        height, width = self.size
        c = self.channel_count
        return (c, height, width) if self.layout == "CHW" else (height, width, c)


class TextPreprocess(_Strict):
    """Strings in; token ids (and masks) from a Hugging Face `tokenizer.json` out."""

    kind: Literal["text"]
    name: str = Field("text", min_length=1, max_length=128, description="the request's input")
    tokenizer: str = "tokenizer.json"
    max_tokens: int = Field(512, ge=1, le=1_000_000)
    truncate: bool = False
    input_ids: str = "input_ids"
    attention_mask: str | None = "attention_mask"
    token_type_ids: str | None = None

    @field_validator("tokenizer")
    @classmethod
    def _file(cls, value: str) -> str:
        if not FILE_NAME.match(value):
            raise ValueError("tokenizer is the name of a file beside model.toml, not a path")
        return value

    def model_inputs(self) -> list[str]:
        names = [self.input_ids, self.attention_mask, self.token_type_ids]
        return [n for n in names if n is not None]


class PostprocessConfig(_Strict):
    """What V1 (and the embeddings API) answer with, from the model's first output."""

    softmax: bool = False
    top_k: int | None = Field(None, ge=1, le=1000)
    l2_normalize: bool = False

    @model_validator(mode="after")
    def _one_kind(self) -> PostprocessConfig:
        if self.l2_normalize and (self.softmax or self.top_k):
            raise ValueError("l2_normalize (embeddings) does not go with softmax or top_k")
        return self

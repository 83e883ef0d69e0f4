"""The schema of `model.toml`: a model's signature, batching, cache, processors and pins."""

from __future__ import annotations

import math
import re
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from torchgate.processors.config import ImagePreprocess, PostprocessConfig, TextPreprocess
from torchgate.serving.datatypes import DATATYPES

MODEL_NAME = re.compile(r"^[a-z0-9][a-z0-9_.-]*$")  # a model folder's name
MAX_REQUESTED_NAME = 64


def requestable_name(name: str) -> bool:
    """Whether a name from a request can be a model's: a folder's name of at most 64
    characters. The repository API loads nothing else, and errors never echo anything else."""
    return len(name) <= MAX_REQUESTED_NAME and MODEL_NAME.match(name) is not None


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TensorSpec(_Strict):
    """One input or output: its name, datatype and the shape of one row (no batch dim)."""

    name: str = Field(min_length=1, max_length=128)
    datatype: str
    shape: tuple[int, ...]

    @field_validator("datatype")
    @classmethod
    def _datatype(cls, value: str) -> str:
        if value not in DATATYPES:
            raise ValueError(f"datatype must be one of {', '.join(DATATYPES)}")
        return value

    @field_validator("shape")
    @classmethod
    def _shape(cls, value: tuple[int, ...]) -> tuple[int, ...]:
        if any(d == 0 or d < -1 for d in value):
            raise ValueError("every dimension must be positive or -1 (variable)")
        return value

    @property
    def row_elements(self) -> int | None:
        """Elements in one row, or None when a dimension is variable."""
        return None if -1 in self.shape else math.prod(self.shape)


class BatchingConfig(_Strict):
    max_delay_ms: float = Field(0.0, ge=0, le=10_000)
    max_queue_rows: int = Field(2048, ge=1)
    # text models: padded tokens in one forward; rows of similar length go together
    max_batch_tokens: int | None = Field(None, ge=1, le=10_000_000)
    timeout_ms: float = Field(10_000.0, gt=0)
    instances: int = Field(1, ge=1, le=64)


class CacheConfig(_Strict):
    ttl_s: float = Field(300.0, ge=0)
    max_entries: int = Field(10_000, ge=1)
    # "key": each API key has its own entries, so no key learns what another asked;
    # "shared": every key hits every entry (more hits; a hit then says someone sent it)
    scope: Literal["key", "shared"] = "key"


class ValidationConfig(_Strict):
    """The accuracy gate on `validation.npz` (`torchgate validate`, admin loads)."""

    min_accuracy: float = Field(0.95, ge=0, le=1)
    max_drop: float = Field(0.01, ge=0, le=1, description="below the default version's accuracy")
    min_cosine: float = Field(0.99, ge=-1, le=1, description="embeddings: to the expected ones")


class CanaryConfig(_Strict):
    """A canary rollout: `version` takes `weight` of the requests that name no version,
    stepping up through `steps` while it is not measurably worse than the stable version
    (`lifecycle.canary_gates`); rolled back when it is."""

    version: int = Field(ge=0)
    weight: float = Field(0.1, ge=0, le=1)
    max_error_rate: float = Field(
        0.01, ge=0, le=1, description="how far the error rate may exceed the stable version's"
    )
    max_p99_ratio: float = Field(1.5, ge=1, description="p99 over the stable version's p99")
    max_p99_ms: float = Field(500.0, gt=0, description="p99 ceiling, whatever the stable does")
    min_requests: int = Field(200, ge=1)
    steps: tuple[float, ...] = (0.1, 0.5, 1.0)
    window_s: float = Field(300.0, gt=0, description="outcomes older than this are forgotten")

    @field_validator("steps")
    @classmethod
    def _steps(cls, value: tuple[float, ...]) -> tuple[float, ...]:
        if not value or value[-1] != 1.0:
            raise ValueError("steps must end at 1.0 (promotion)")
        if any(not 0 < s <= 1 for s in value) or list(value) != sorted(set(value)):
            raise ValueError("steps must be increasing weights in (0, 1]")
        return value


class ModelConfig(_Strict):
    """A validated `model.toml`."""

    platform: Literal["torchscript"] = "torchscript"
    max_batch_size: int = Field(64, ge=0, le=65_536)
    labels: tuple[str, ...] | None = None
    default_version: int | Literal["latest"] = "latest"
    precision: Literal["fp32", "fp16", "bf16"] = "fp32"
    # startup: loaded at start-up, evictable within the memory budget; on_demand: loaded
    # on its first request; pinned: loaded at start-up, never evicted (serving/residency.py)
    load: Literal["startup", "on_demand", "pinned"] = "startup"
    inputs: tuple[TensorSpec, ...] = Field(min_length=1)
    outputs: tuple[TensorSpec, ...] = Field(min_length=1)
    batching: BatchingConfig = BatchingConfig()
    cache: CacheConfig = CacheConfig()
    validation: ValidationConfig = ValidationConfig()
    canary: CanaryConfig | None = None
    preprocess: Annotated[ImagePreprocess | TextPreprocess, Field(discriminator="kind")] | None = (
        None
    )
    postprocess: PostprocessConfig | None = None
    sha256: dict[str, str] = Field(
        default_factory=dict, description="version -> expected SHA-256 of its model.pt"
    )

    @model_validator(mode="after")
    def _consistent(self) -> ModelConfig:
        for group in (self.inputs, self.outputs):
            names = [t.name for t in group]
            if len(set(names)) != len(names):
                raise ValueError(f"tensor names must be unique, got {names}")
        if self.labels is not None:
            first = self.outputs[0]
            if first.shape != (len(self.labels),):
                raise ValueError(
                    f"{len(self.labels)} labels need a first output of shape "
                    f"[{len(self.labels)}], not {list(first.shape)}"
                )
        if self.canary is not None and self.canary.version == self.default_version:
            raise ValueError("canary.version must differ from default_version")
        for version, digest in self.sha256.items():
            if not version.isdigit() or not re.fullmatch(r"[0-9a-f]{64}", digest):
                raise ValueError("sha256 maps a version number to 64 lowercase hex digits")
        if isinstance(self.preprocess, ImagePreprocess):
            self._fits_image(self.preprocess)
        elif isinstance(self.preprocess, TextPreprocess):
            self._fits_text(self.preprocess)
        if self.batching.max_batch_tokens is not None and not isinstance(
            self.preprocess, TextPreprocess
        ):
            raise ValueError('batching.max_batch_tokens needs [preprocess] kind = "text"')
        post = self.postprocess
        if post is not None and post.top_k is not None:
            if self.labels is None:
                raise ValueError("postprocess.top_k needs labels")
            if post.top_k > len(self.labels):
                raise ValueError(f"postprocess.top_k is over the {len(self.labels)} labels")
        return self

    def _fits_image(self, pre: ImagePreprocess) -> None:
        if len(self.inputs) != 1:
            raise ValueError("preprocess kind image feeds a model with exactly one input")
        spec = self.inputs[0]
        if pre.input is not None and pre.input != spec.name:
            raise ValueError(f"preprocess.input {pre.input!r} is not the model's input")
        if spec.datatype not in ("FP16", "FP32", "FP64", "BF16"):
            raise ValueError(f"preprocess kind image needs a float input, not {spec.datatype}")
        if spec.shape != pre.tensor_shape():
            raise ValueError(
                f"preprocess makes {pre.layout} tensors of shape {list(pre.tensor_shape())} "
                f"(channels {pre.channels}, size {list(pre.size)}); input {spec.name!r} "
                f"declares {list(spec.shape)}"
            )

    def _fits_text(self, pre: TextPreprocess) -> None:
        wanted = pre.model_inputs()
        given = [s.name for s in self.inputs]
        if sorted(wanted) != sorted(given):
            raise ValueError(
                f"preprocess kind text feeds inputs {wanted}; the model declares {given}"
            )
        for spec in self.inputs:
            if spec.datatype not in ("INT32", "INT64") or spec.shape != (-1,):
                raise ValueError(
                    f"input {spec.name!r} receives tokens: INT64 (or INT32) of shape [-1]"
                )
        if not self.batched:
            raise ValueError("preprocess kind text needs max_batch_size above 0")
        tokens = self.batching.max_batch_tokens
        if tokens is not None and tokens < pre.max_tokens:
            raise ValueError(
                f"batching.max_batch_tokens {tokens} cannot hold one text of "
                f"preprocess.max_tokens {pre.max_tokens}"
            )

    @property
    def batched(self) -> bool:
        return self.max_batch_size > 0

    @property
    def processor_inputs(self) -> tuple[TensorSpec, ...] | None:
        """What a request carries instead of the model's inputs when the model has a
        preprocessor: one BYTES element per row (an encoded image or a text)."""
        if self.preprocess is None:
            return None
        return (TensorSpec(name=self.preprocess.name, datatype="BYTES", shape=(1,)),)

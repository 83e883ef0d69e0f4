"""The accuracy gate: a model version must classify its model's `validation.npz` well
enough before it is served.

`validation.npz` beside `model.toml` holds `x` (rows shaped like the model's one input;
for several inputs, one array per input name) and `y` (the true class of each row). A
version passes when its accuracy is at least `min_accuracy` and no more than `max_drop`
below the accuracy of its baseline (the version serving by default without it). An
embedding model's set holds `texts` and their expected `embeddings` instead: a version
passes when the cosine of every text's embedding to the expected one is at least
`min_cosine`. `evaluate` and `judge` are what both `torchgate validate` (in CI, through
`gate`) and the server (`serving.admission`: at start-up and on every load) run; it is
CPU work, so the server calls it in a thread, never on the event loop.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from torchgate.problems import first_line
from torchgate.serving.datatypes import NUMPY
from torchgate.serving.model import LoadedModel
from torchgate.serving.model_config import ModelConfig, ValidationConfig

FILE = "validation.npz"


class ValidationError(Exception):
    """`validation.npz` cannot be used with this model (missing arrays, wrong shapes)."""


@dataclass(slots=True)
class ValidationSet:
    """Held-out rows: one array per model input, batch dim first, and their classes; or
    texts (`texts`) and their expected embeddings (in `y`)."""

    inputs: list[np.ndarray]
    y: np.ndarray
    texts: list[str] | None = None

    @classmethod
    def read(cls, folder: Path, config: ModelConfig) -> ValidationSet | None:
        """The model folder's `validation.npz`, or None when it has none."""
        path = folder / FILE
        if not path.is_file():
            return None
        try:
            with np.load(path, allow_pickle=False) as data:
                arrays = dict(data)
        except (OSError, ValueError) as exc:
            raise ValidationError(f"{path.name}: not a readable .npz ({exc})") from None
        if "texts" in arrays:
            return cls._embeddings(path, arrays, config)
        single = len(config.inputs) == 1
        names = ["x"] if single else [spec.name for spec in config.inputs]
        missing = [n for n in [*names, "y"] if n not in arrays]
        if missing:
            raise ValidationError(f"{path.name} has no array {missing[0]!r}")
        y = arrays["y"].reshape(-1).astype(np.int64)
        inputs = []
        for name, spec in zip(names, config.inputs, strict=True):
            array = arrays[name].astype(NUMPY[spec.datatype], copy=False)
            if len(array) != len(y) or (config.batched and array.shape[1:] != spec.shape):
                raise ValidationError(
                    f"{path.name}: {name!r} has shape {list(array.shape)}, the model takes "
                    f"[{len(y)}, {', '.join(map(str, spec.shape))}]"
                )
            inputs.append(array)
        return cls(inputs, y)

    @classmethod
    def _embeddings(cls, path: Path, arrays: dict[str, np.ndarray], config: ModelConfig):
        if config.preprocess is None or config.preprocess.kind != "text":
            raise ValidationError(f"{path.name} holds texts; the model has no text processor")
        if "embeddings" not in arrays:
            raise ValidationError(f"{path.name} has texts and no array 'embeddings'")
        texts = [str(t) for t in arrays["texts"].reshape(-1)]
        expected = arrays["embeddings"].astype(np.float32)
        width = config.outputs[0].shape
        if expected.shape != (len(texts), *width):
            raise ValidationError(
                f"{path.name}: 'embeddings' has shape {list(expected.shape)}, expected "
                f"[{len(texts)}, {', '.join(map(str, width))}]"
            )
        return cls([], expected, texts)

    def __len__(self) -> int:
        return len(self.y)


@dataclass(slots=True)
class Evaluation:
    """How one version did on the validation set."""

    version: int
    rows: int
    accuracy: float
    recall: dict[str, float]  # class name -> share of its rows classified right
    ms_per_row: float
    model_bytes: int
    cosine: float | None = None  # an embedding set's lowest cosine to the expected vector


@dataclass(slots=True)
class GateResult:
    """A version's evaluation, the baseline's, and why it fails (nothing when it passes)."""

    version: int
    evaluation: Evaluation | None
    baseline: Evaluation | None = None
    problems: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.problems

    @property
    def summary(self) -> str:
        if self.passed:
            return f"version {self.version} passed the accuracy gate"
        return f"version {self.version} failed the accuracy gate: {'; '.join(self.problems)}"


def evaluate(model: LoadedModel, data: ValidationSet) -> Evaluation:
    """Classify every row (in batches of `max_batch_size`); the top output is the class."""
    if data.texts is not None:
        return _evaluate_embeddings(model, data.texts, data.y)
    config = model.config
    step = config.max_batch_size if config.batched else 1
    predicted = np.empty(len(data), dtype=np.int64)
    spent = 0.0
    for start in range(0, len(data), step):
        chunk = [a[start : start + step] for a in data.inputs]
        if not config.batched:
            chunk = [a[0] for a in chunk]
        began = time.perf_counter()
        outputs = model.forward(chunk)
        spent += time.perf_counter() - began
        scores = outputs[0].reshape(len(chunk[0]) if config.batched else 1, -1)
        predicted[start : start + step] = scores.argmax(axis=1)
    right = predicted == data.y
    names = config.labels
    recall = {}
    for cls in np.unique(data.y).tolist():
        mask = data.y == cls
        name = names[cls] if names is not None and 0 <= cls < len(names) else str(cls)
        recall[name] = float(right[mask].mean())
    return Evaluation(
        version=model.version,
        rows=len(data),
        accuracy=float(right.mean()) if len(data) else 0.0,
        recall=recall,
        ms_per_row=spent * 1000 / max(1, len(data)),
        model_bytes=model.load_bytes,
    )


def _evaluate_embeddings(model: LoadedModel, texts: list[str], expected: np.ndarray) -> Evaluation:
    """Embed every text through the model's own text processor; cosine to the expected."""
    pre = model.preprocessor
    assert pre is not None
    step = model.config.max_batch_size
    got = []
    spent = 0.0
    for start in range(0, len(texts), step):
        prepared = pre.prepare(list(texts[start : start + step]))
        began = time.perf_counter()
        got.append(model.forward(prepared.inputs)[0].reshape(prepared.rows, -1))
        spent += time.perf_counter() - began
    vectors = np.concatenate(got).astype(np.float64)
    target = expected.reshape(len(texts), -1).astype(np.float64)
    norms = np.linalg.norm(vectors, axis=1) * np.linalg.norm(target, axis=1)
    cosine = (vectors * target).sum(axis=1) / np.maximum(norms, 1e-12)
    lowest = float(cosine.min()) if len(texts) else 0.0
    return Evaluation(
        version=model.version,
        rows=len(texts),
        accuracy=lowest,
        recall={},
        ms_per_row=spent * 1000 / max(1, len(texts)),
        model_bytes=model.load_bytes,
        cosine=lowest,
    )


def gate(
    candidate: LoadedModel,
    data: ValidationSet,
    bounds: ValidationConfig,
    baseline: LoadedModel | None = None,
) -> GateResult:
    """Evaluate `candidate` (and `baseline`, when given) and hold it to `bounds`.

    A candidate whose forward fails on the validation rows fails the gate; a baseline
    that fails is reported and not compared against."""
    result = GateResult(candidate.version, None)
    try:
        result.evaluation = evaluate(candidate, data)
    except Exception as exc:  # a broken version: whatever its forward raises
        result.problems.append(forward_failed(exc))
        return result
    if baseline is not None and result.evaluation.cosine is None:
        try:
            result.baseline = evaluate(baseline, data)
        except Exception as exc:
            result.problems.append(
                f"baseline version {baseline.version} failed ({first_line(exc)})"
            )
    result.problems += judge(result.evaluation, bounds, result.baseline)
    return result


def judge(
    evaluation: Evaluation, bounds: ValidationConfig, baseline: Evaluation | None = None
) -> list[str]:
    """Why an evaluated version fails `bounds` (nothing when it passes): its accuracy (or
    an embedding's cosine) under the floor, or its drop below `baseline`'s accuracy."""
    if evaluation.cosine is not None:  # embeddings: each against its expected vector
        if evaluation.cosine < bounds.min_cosine:
            return [
                f"cosine {evaluation.cosine:.6f} to an expected embedding is under "
                f"{bounds.min_cosine}"
            ]
        return []
    problems = []
    accuracy = evaluation.accuracy
    if accuracy < bounds.min_accuracy:
        problems.append(f"accuracy {accuracy:.4f} is under {bounds.min_accuracy}")
    if baseline is not None:
        drop = baseline.accuracy - accuracy
        if drop > bounds.max_drop + 1e-12:
            problems.append(
                f"accuracy {accuracy:.4f} is {drop:.4f} below version {baseline.version}'s "
                f"{baseline.accuracy:.4f} (max drop {bounds.max_drop})"
            )
    return problems


def forward_failed(exc: BaseException) -> str:
    return f"forward failed on the validation rows ({first_line(exc)})"


def baseline_version(config: ModelConfig, versions: list[int], candidate: int) -> int | None:
    """The version `candidate` is compared against: the default one by `model.toml`; with
    "latest", the latest other than the candidate that is not the `[canary]` version (what
    serves by default without it). None when the candidate is the configured default
    itself or is alone."""
    if config.default_version != "latest":
        default = config.default_version
        return default if default != candidate and default in versions else None
    canary = config.canary.version if config.canary is not None else None
    others = [v for v in versions if v != candidate and v != canary]
    return max(others) if others else None

"""`check_signature`: a freshly loaded version run on the shapes `model.toml` declares
(and on what its preprocessor makes of a blank sample), its outputs checked and its first
forwards spent as warm-up; `cause`, what a failure says in one line.
"""

from __future__ import annotations

import re

import numpy as np

from torchgate.errors import ModelLoadError
from torchgate.processors.factory import sample
from torchgate.serving.model import LoadedModel, dummy_inputs
from torchgate.serving.model_config import TensorSpec

WARMUP_ROUNDS = 3


def check_signature(model: LoadedModel) -> None:
    """Run dummy forwards on the declared shapes, check the outputs, and warm up."""
    config = model.config
    sizes = (
        sorted({1, min(2, config.max_batch_size), config.max_batch_size}) if config.batched else [0]
    )
    for rows in sizes:
        inputs = dummy_inputs(config, rows)
        for _ in range(WARMUP_ROUNDS):
            try:
                outputs = model.forward(inputs)
            except Exception as exc:
                raise ModelLoadError(
                    model.path,
                    f"the model fails on the inputs model.toml declares "
                    f"({_tried(config.inputs, inputs, rows)}): {cause(exc)}",
                ) from None
        _check_outputs(model, outputs, rows)
    pre = model.preprocessor
    if pre is not None:
        # what the preprocessor makes of a blank image or a short text must run
        try:
            prepared = pre.prepare(sample(pre))
        except Exception as exc:
            raise ModelLoadError(
                model.path, f"[preprocess] fails on a blank sample: {cause(exc)}"
            ) from None
        try:
            outputs = model.forward(prepared.inputs)
        except Exception as exc:
            tried = _tried(config.inputs, prepared.inputs, prepared.rows)
            raise ModelLoadError(
                model.path,
                f"the model fails on what [preprocess] makes ({tried}): {cause(exc)}",
            ) from None
        _check_outputs(model, outputs, prepared.rows)


_EXCEPTION_NAME = re.compile(r"^(?:[A-Za-z_][\w.]*\.)?[A-Z]\w*(?:Error|Exception): ")
_TORCHSCRIPT = "TorchScript interpreter"


def cause(exc: BaseException, limit: int = 500) -> str:
    """An exception's message in one line. TorchScript's interpreter puts two tracebacks
    first and the error itself (e.g. the shapes that did not multiply) last, so that last
    line is taken; otherwise the first."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    if not lines:
        return type(exc).__name__
    line = lines[-1] if _TORCHSCRIPT in lines[0] else lines[0]
    line = _EXCEPTION_NAME.sub("", line)
    return line if len(line) <= limit else line[: limit - 3] + "..."


def _tried(specs: tuple[TensorSpec, ...], inputs: list[np.ndarray], rows: int) -> str:
    """What a check ran: each input's declared shape (one row's) and the array's shape."""
    parts = []
    for spec, array in zip(specs, inputs, strict=True):
        declared = f"input {spec.name!r} {spec.datatype} {list(spec.shape)}"
        shape = list(getattr(array, "shape", ()))
        parts.append(f"{declared} per row, run as {shape}" if rows else f"{declared}, no batch")
    return "; ".join(parts)


def _check_outputs(model: LoadedModel, outputs: list[np.ndarray], rows: int) -> None:
    config = model.config
    for spec, out in zip(config.outputs, outputs, strict=True):
        want = ((rows,) if config.batched else ()) + spec.shape
        if len(out.shape) != len(want) or any(
            w != -1 and w != g for w, g in zip(want, out.shape, strict=True)
        ):
            got = list(out.shape)
            if config.batched and got[:1] == [rows]:
                problem = f"gives rows of {got[1:]}, model.toml declares {list(spec.shape)}"
            else:
                problem = f"has shape {got}, model.toml declares {list(want)}"
            run = f"{rows} {'row' if rows == 1 else 'rows'}" if config.batched else "no batch"
            raise ModelLoadError(model.path, f"output {spec.name!r} {problem} (run with {run})")

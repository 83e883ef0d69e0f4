"""`LoadedModel`: one TorchScript version on its device, and the forward pass the runners call."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from torchgate.serving.datatypes import NUMPY, to_numpy, to_tensor
from torchgate.serving.model_config import ModelConfig

if TYPE_CHECKING:
    from torchgate.processors.factory import Preprocessor
    from torchgate.processors.post import Postprocessor

_AUTOCAST = {"fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass(slots=True)
class LoadedModel:
    """A model version ready to run: its modules (one per runner on a GPU) and signature."""

    name: str
    version: int
    config: ModelConfig
    path: Path
    device: torch.device
    modules: list[torch.jit.ScriptModule]
    sha256: str
    load_bytes: int = 0  # parameters and buffers (every copy)
    resident_bytes: int = 0  # and what its forwards allocate: what the memory budget counts
    preprocessor: Preprocessor | None = None  # the model's, shared by its versions
    postprocessor: Postprocessor | None = None
    _pin: bool = field(init=False, default=False)

    def __post_init__(self) -> None:
        self._pin = self.device.type == "cuda"

    @property
    def key(self) -> str:
        return f"{self.name}/{self.version}"

    def forward(self, inputs: list[np.ndarray], instance: int = 0) -> list[np.ndarray]:
        """Run one forward on whole arrays (batch dim first when the model batches).

        Called from a runner thread, never from the event loop. On CUDA the batch is staged
        in pinned host memory so that the copy to the device does not block.
        """
        module = self.modules[instance % len(self.modules)]
        tensors: list[object] = []
        for spec, array in zip(self.config.inputs, inputs, strict=True):
            if spec.datatype == "BYTES":  # text reaches the model as List[str], row-major
                tensors.append([_text(v) for v in array.reshape(-1)])
                continue
            tensor = to_tensor(array, spec.datatype)
            if self._pin:
                tensor = tensor.pin_memory().to(self.device, non_blocking=True)
            tensors.append(tensor)
        autocast = (
            torch.autocast("cuda", dtype=_AUTOCAST[self.config.precision])
            if self._pin and self.config.precision in _AUTOCAST
            else contextlib.nullcontext()
        )
        with torch.inference_mode(), autocast:
            result = module(*tensors)
        return self._outputs(result)

    def _outputs(self, result: object) -> list[np.ndarray]:
        specs = self.config.outputs
        if isinstance(result, torch.Tensor):
            values = [result]
        elif isinstance(result, dict):
            missing = [s.name for s in specs if s.name not in result]
            if missing:
                raise RuntimeError(f"model returned no output named {missing[0]!r}")
            values = [result[s.name] for s in specs]
        elif isinstance(result, list | tuple):
            values = list(result)
        else:
            raise RuntimeError(f"model returned {type(result).__name__}, not tensors")
        if len(values) != len(specs):
            raise RuntimeError(f"model returned {len(values)} outputs, signature has {len(specs)}")
        arrays = []
        for spec, value in zip(specs, values, strict=True):
            if not isinstance(value, torch.Tensor):
                raise RuntimeError(f"output {spec.name!r} is {type(value).__name__}, not a tensor")
            array = to_numpy(value)
            wanted = NUMPY[spec.datatype]
            arrays.append(array if array.dtype == wanted else array.astype(wanted))
        return arrays


def dummy_inputs(config: ModelConfig, rows: int) -> list[np.ndarray]:
    """Zeros (empty strings for BYTES) in the declared shapes, -1 taken as 1: the input the
    signature check ran at load, so known to work. `rows` 0: no batch dimension."""
    arrays = []
    for spec in config.inputs:
        dims = tuple(1 if d == -1 else d for d in spec.shape)
        full = ((rows,) if rows else ()) + dims
        if spec.datatype == "BYTES":
            arrays.append(np.full(full, "", dtype=object))
        else:
            arrays.append(np.zeros(full, dtype=NUMPY[spec.datatype]))
    return arrays


def _text(value: object) -> str:
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value).decode("utf-8", errors="replace")
    return str(value)


def parameter_bytes(module: torch.nn.Module) -> int:
    """Bytes held by a module's parameters and buffers, and by the packed weights of
    quantized layers (`_packed_params`), which are neither: without them a dynamically
    quantized model would count only its unquantized layers."""
    tensors = [*module.parameters(), *module.buffers()]
    for sub in module.modules():
        packed = getattr(sub, "_packed_params", None)
        if isinstance(packed, torch.ScriptObject):
            tensors += _tensors(packed.__getstate__())
    return sum(t.numel() * t.element_size() for t in tensors)


def _tensors(value: object) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, list | tuple):
        return [t for item in value for t in _tensors(item)]
    return []

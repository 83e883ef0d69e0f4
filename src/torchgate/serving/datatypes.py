"""Open Inference Protocol datatypes and their numpy and torch counterparts."""

from __future__ import annotations

import numpy as np
import torch

# BF16 has no numpy dtype: it travels as raw uint16 bit patterns and becomes torch.bfloat16.
NUMPY: dict[str, np.dtype] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype(np.uint8),
    "UINT16": np.dtype(np.uint16),
    "UINT32": np.dtype(np.uint32),
    "UINT64": np.dtype(np.uint64),
    "INT8": np.dtype(np.int8),
    "INT16": np.dtype(np.int16),
    "INT32": np.dtype(np.int32),
    "INT64": np.dtype(np.int64),
    "FP16": np.dtype(np.float16),
    "FP32": np.dtype(np.float32),
    "FP64": np.dtype(np.float64),
    "BF16": np.dtype(np.uint16),
    "BYTES": np.dtype(object),
}

DATATYPES = tuple(NUMPY)


def to_tensor(array: np.ndarray, datatype: str) -> torch.Tensor:
    tensor = torch.from_numpy(np.ascontiguousarray(array))
    if datatype == "BF16":
        return tensor.view(torch.bfloat16)
    return tensor


def to_numpy(tensor: torch.Tensor) -> np.ndarray:
    tensor = tensor.detach()
    if tensor.device.type != "cpu":
        tensor = tensor.cpu()
    if tensor.dtype == torch.bfloat16:
        return tensor.view(torch.uint16).numpy()
    return tensor.numpy()

"""What a loaded version holds in memory, as the memory budget counts it (`residency`).

A version holds its parameters and buffers (`model.parameter_bytes`, every copy), and each
forward allocates on top of them, as its warm-up shows: on a GPU, the peak of the device's
allocated memory over the load and warm-up, read from torch's allocator; on the CPU, the
inputs and outputs of a forward at the largest batch (torch keeps no peak of its CPU
allocations to read; its profiler could count them, but starting it costs more memory
than most models it would measure, and its intermediate tensors are freed as the forward
goes). Every runner may run a forward at once, so that working set counts once per
instance.

Before a version is loaded its size is estimated from its file (a TorchScript archive
stores its tensors uncompressed), or taken from its last load.
"""

from __future__ import annotations

import logging

import torch

from torchgate.serving.model import LoadedModel, dummy_inputs

log = logging.getLogger("torchgate.footprint")


def device_key(device: torch.device) -> str:
    """The budget a device's models count against: "cpu", or "cuda:N" for each GPU."""
    if device.type == "cuda":
        return f"cuda:{device.index if device.index is not None else torch.cuda.current_device()}"
    return device.type


def cpu_working_bytes(model: LoadedModel) -> int:
    """Bytes one forward at the largest batch takes in and gives back on the CPU: its
    inputs and outputs (0 if it cannot tell)."""
    config = model.config
    inputs = dummy_inputs(config, config.max_batch_size if config.batched else 0)
    try:
        outputs = model.forward(inputs)
    except Exception as exc:  # measuring must never fail a load that passed its checks
        log.warning(
            "could not measure a forward's memory", extra={"model": model.key, "error": str(exc)}
        )
        return 0
    return sum(a.nbytes for a in [*inputs, *outputs] if a.dtype != object)


def resident_bytes(model: LoadedModel, instances: int, gpu_peak: int = 0) -> int:
    """What the budget counts for `model` once loaded: `load_bytes` (its parameters and
    buffers) plus a forward's working set per runner. `gpu_peak`: on a GPU, the most the
    device held for this load over the load and warm-up."""
    if model.device.type == "cuda":
        return model.load_bytes + max(0, gpu_peak - model.load_bytes) * instances
    return model.load_bytes + cpu_working_bytes(model) * instances

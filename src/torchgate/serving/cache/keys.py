"""Row keys: one SHA-256 per row over a canonical layout.

The layout: the model's name, version and file digest, the tenant (the API key's name
when the model's cache is scoped per key, else empty), then for each input its name,
datatype, row shape and raw bytes. (Python's `hash()` is salted per process, collides,
and cannot be shared between replicas.)
"""

from __future__ import annotations

import hashlib
import struct
from typing import Any

import numpy as np

from torchgate.serving.model import LoadedModel


def key_prefix(model: LoadedModel) -> tuple[Any, list[bytes]]:
    """The hash state after the model part of the layout, and each input's name and datatype
    part: the same for every row of a version, so a cache computes them once."""
    prefix = hashlib.sha256()
    for part in (
        b"torchgate-row-v2",
        model.name.encode(),
        str(model.version).encode(),
        model.sha256.encode(),
    ):
        prefix.update(struct.pack("<I", len(part)) + part)
    specs = [
        struct.pack("<I", len(spec.name))
        + spec.name.encode()
        + spec.datatype.encode().ljust(8, b"\0")
        for spec in model.config.inputs
    ]
    return prefix, specs


def row_keys(
    model: LoadedModel,
    inputs: list[np.ndarray],
    rows: int,
    prefix: tuple[Any, list[bytes]] | None = None,
    tenant: str = "",
    material: list[bytes] | None = None,
) -> list[bytes]:
    """One SHA-256 digest per row over the canonical layout described above; with
    `material` (what a preprocessor made each row from: the encoded image, the exact
    text) that stands in for the inputs."""
    start, specs = prefix or key_prefix(model)
    owner = tenant.encode()
    start = start.copy()
    start.update(struct.pack("<I", len(owner)) + owner)
    if material is not None:
        keys = []
        for data in material:
            h = start.copy()
            h.update(b"raw" + struct.pack("<Q", len(data)) + data)
            keys.append(h.digest())
        return keys
    batched = model.config.batched
    parts: list[tuple[bytes, np.ndarray | None, np.ndarray]] = []
    for spec, array in zip(specs, inputs, strict=True):
        shape = array.shape[1:] if batched else array.shape
        head = spec + struct.pack(f"<I{len(shape)}q", len(shape), *shape)
        if array.dtype.kind == "O":  # BYTES: per row, below
            parts.append((head, None, array))
            continue
        contiguous = np.ascontiguousarray(array)
        row_bytes = contiguous.itemsize * (contiguous.size // rows if batched else contiguous.size)
        parts.append((head + struct.pack("<Q", row_bytes), contiguous, array))
    keys = []
    for i in range(rows):
        h = start.copy()
        for head, contiguous, array in parts:
            h.update(head)
            if contiguous is None:
                data = _row_bytes(array[i] if batched else array)
                h.update(struct.pack("<Q", len(data)) + data)
            else:  # the row's bytes straight from the array's buffer
                h.update(contiguous[i] if batched else contiguous)
        keys.append(h.digest())
    return keys


def _row_bytes(row: np.ndarray) -> bytes:
    if row.dtype.kind == "O":  # BYTES: length-prefixed UTF-8, never object pointers
        parts = [v.encode() if isinstance(v, str) else bytes(v) for v in row.reshape(-1)]
        return b"".join(struct.pack("<Q", len(p)) + p for p in parts)
    return np.ascontiguousarray(row).tobytes()

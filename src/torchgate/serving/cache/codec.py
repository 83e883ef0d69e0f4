"""A row of outputs as bytes for the shared tier, and back."""

from __future__ import annotations

import struct

import numpy as np
import orjson

Row = list[np.ndarray]  # one row's outputs, each with a leading dim of 1


def encode_row(row: Row) -> bytes | None:
    """Compact binary for Redis: a JSON header of dtypes and shapes, then raw bytes."""
    if any(a.dtype.kind == "O" for a in row):
        return None
    header = orjson.dumps([[a.dtype.str, list(a.shape)] for a in row])
    return struct.pack("<I", len(header)) + header + b"".join(a.tobytes() for a in row)


def decode_row(blob: bytes) -> Row:
    (size,) = struct.unpack_from("<I", blob)
    offset = 4 + size
    row = []
    for dtype, shape in orjson.loads(blob[4:offset]):
        array = np.frombuffer(blob, dtype=np.dtype(dtype), count=int(np.prod(shape)), offset=offset)
        row.append(array.reshape(shape))
        offset += array.nbytes
    return row

"""The Open Inference Protocol's binary tensor data extension, both ways.

A binary request is a JSON header of `Inference-Header-Content-Length` bytes followed by
the raw tensors, one after another in the order of the inputs that declare a
`binary_data_size`. Raw tensors are little-endian and row-major; BYTES elements are each
a 4-byte little-endian length and that many bytes; BF16 travels as its raw 16 bits.
Numeric tensors are read with `np.frombuffer`: no element ever becomes a Python object.
"""

from __future__ import annotations

import struct

import numpy as np

from torchgate.api.codec import check_string_count
from torchgate.errors import BadRequest
from torchgate.serving.datatypes import NUMPY

HEADER_LENGTH = "Inference-Header-Content-Length"

_BF16_EXPONENT = 0x7F80
_LENGTH = struct.Struct("<I")
_CLOSE = ord("}")
_BLANK = b" \t\r\n"  # JSON's whitespace
_TAIL = 4096


def split(body: bytes, header_length: str | None) -> tuple[bytes, memoryview]:
    """The JSON header and the binary part that follows it (empty without the header).

    Only the header's last byte is looked at here: a JSON object ends with "}", so a
    length that cuts the JSON short or runs into the tensors is named as the header's
    mistake, not reported as malformed JSON."""
    if header_length is None:
        if _last(memoryview(body)) not in (None, _CLOSE) and b'"binary_data_size"' in body:
            raise BadRequest(
                f"the body carries binary tensors (binary_data_size) but no {HEADER_LENGTH} "
                "header: send the JSON part's length in bytes in it"
            )
        return body, memoryview(b"")
    text = header_length.strip()
    if not (text.isascii() and text.isdigit()) or len(text) > 19:
        raise BadRequest(f"{HEADER_LENGTH} must be a non-negative integer")
    size = int(text)
    if size > len(body):
        raise BadRequest(f"{HEADER_LENGTH} is {size} but the body has only {len(body)} bytes")
    view = memoryview(body)
    if _last(view[:size]) != _CLOSE:
        raise BadRequest(
            f"{HEADER_LENGTH} is {size}, but the body's first {size} bytes are not a whole "
            "JSON object: it must be the length in bytes of the JSON part alone"
        )
    return bytes(view[:size]), view[size:]


def _last(data: memoryview) -> int | None:
    """The last byte that is not JSON whitespace, among the last few KiB (None when there
    is none there: a body padded with megabytes of blanks is not scanned byte by byte)."""
    tail = bytes(data[-_TAIL:]).rstrip(_BLANK)
    return tail[-1] if tail else None


class BinaryReader:
    """Hands out the binary part's consecutive slices, one per binary input."""

    def __init__(self, data: memoryview) -> None:
        self._data = data
        self._offset = 0

    def take(self, size: object, what: str) -> memoryview:
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise BadRequest(f"{what}: binary_data_size must be a non-negative integer")
        end = self._offset + size
        if end > len(self._data):
            left = len(self._data) - self._offset
            raise BadRequest(
                f"{what}: binary_data_size {size} is past the end of the body "
                f"({left} bytes of binary data left)"
            )
        chunk = self._data[self._offset : end]
        self._offset = end
        return chunk

    def finish(self) -> None:
        left = len(self._data) - self._offset
        if left:
            raise BadRequest(f"{left} bytes of binary data belong to no input")


def read_tensor(
    raw: memoryview, datatype: str, shape: list[int], count: int, what: str
) -> np.ndarray:
    """`raw` as an array of `shape` (with `count` elements), checked like a JSON tensor."""
    if datatype == "BYTES":
        return _read_strings(raw, count, what).reshape(shape)
    dtype = NUMPY[datatype]
    if len(raw) != count * dtype.itemsize:
        raise BadRequest(
            f"{what}: {len(raw)} bytes of binary data, shape {shape} of {datatype} needs "
            f"{count * dtype.itemsize}"
        )
    # astype copies: torch refuses read-only (and misaligned) buffers, and the copy is one
    # memcpy, byte-swapped only on a big-endian host.
    array = np.frombuffer(raw, dtype=dtype.newbyteorder("<")).astype(dtype).reshape(shape)
    _check_values(array, datatype, what)
    return array


def _check_values(array: np.ndarray, datatype: str, what: str) -> None:
    if datatype == "BOOL":
        if array.size and array.view(np.uint8).max() > 1:
            raise BadRequest(f"{what}: BOOL bytes must be 0 or 1")
    elif datatype == "BF16":
        if array.size and ((array & _BF16_EXPONENT) == _BF16_EXPONENT).any():
            raise BadRequest(f"{what}: NaN and infinite values are not accepted")
    elif array.dtype.kind == "f" and not np.isfinite(array).all():
        raise BadRequest(f"{what}: NaN and infinite values are not accepted")


def _read_strings(raw: memoryview, count: int, what: str) -> np.ndarray:
    # every element carries a 4-byte length: a count the data cannot hold is refused before
    # anything is allocated for it
    if count * _LENGTH.size > len(raw):
        raise BadRequest(
            f"{what}: {len(raw)} bytes of binary data cannot hold {count} BYTES elements "
            f"({_LENGTH.size} bytes of length each, at least)"
        )
    check_string_count(count, what)
    items = np.empty(count, dtype=object)
    offset = 0
    for i in range(count):
        if offset + 4 > len(raw):
            raise BadRequest(f"{what}: binary BYTES data ends before element {i}")
        (size,) = _LENGTH.unpack_from(raw, offset)
        offset += 4
        if offset + size > len(raw):
            raise BadRequest(f"{what}: binary BYTES element {i} runs past its data")
        items[i] = bytes(raw[offset : offset + size])
        offset += size
    if offset != len(raw):
        raise BadRequest(f"{what}: {len(raw) - offset} bytes of BYTES data after {count} elements")
    return items


def tensor_bytes(array: np.ndarray, datatype: str) -> bytes:
    """An output as the extension's raw bytes."""
    if datatype == "BYTES":
        parts = []
        for item in array.reshape(-1):
            data = item if isinstance(item, bytes) else str(item).encode()
            parts += (_LENGTH.pack(len(data)), data)
        return b"".join(parts)
    little = array.dtype.newbyteorder("<")
    return (array if array.dtype == little else array.astype(little)).tobytes()

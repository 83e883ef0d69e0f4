"""Hostile and broken images, made in memory for the tests."""

from __future__ import annotations

import io
import struct
import zlib

from PIL import Image


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_declaring(width: int, height: int) -> bytes:
    """A ~100-byte PNG whose header declares `width` x `height` pixels (a bomb)."""
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    idat = zlib.compress(b"\0" * 64, 9)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _chunk(b"IHDR", header)
        + _chunk(b"IDAT", idat)
        + _chunk(b"IEND", b"")
    )


def encoded(image: Image.Image, fmt: str, **options: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def animated_gif() -> bytes:
    frames = [Image.new("L", (16, 16), v) for v in (0, 128, 255)]
    return encoded(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50)


def animated_png() -> bytes:
    frames = [Image.new("L", (16, 16), v) for v in (0, 128, 255)]
    return encoded(frames[0], "PNG", save_all=True, append_images=frames[1:], duration=50)


def big_solid_png(width: int = 8000, height: int = 6000) -> bytes:
    """48 million real pixels in a few tens of KB: under a 10 MiB body, over the pixels."""
    return encoded(Image.new("L", (width, height), 255), "PNG", optimize=False)

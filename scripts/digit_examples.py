"""Write models/digits/examples/: pictures of handwritten digits from the held-out split.

Each is one row of `validation.npz` (a real handwritten digit the model never trained on)
drawn as a photo-like picture: dark ink on light paper, 12x larger with smooth strokes,
wide margins, PNG and JPEG. `[preprocess]` must turn it back into the 8x8 grey 0..16
form; the tests check that every example answers the same label as its tensor.
"""

from __future__ import annotations

import argparse
import io
from pathlib import Path

import numpy as np
from PIL import Image

LABELS = ("0", "2", "3", "5", "7")  # each picture is the first validation row of its label


def picture(
    pixels: np.ndarray, *, scale: int = 12, margin: tuple[int, int] = (30, 44)
) -> Image.Image:
    """An 8x8 digit (0..16, ink high) as dark ink on light paper."""
    grey = (255 - pixels.reshape(8, 8) * 255 / 16).round().astype(np.uint8)
    ink = Image.fromarray(grey, "L").resize((8 * scale, 8 * scale), Image.Resampling.BICUBIC)
    across, down = margin
    paper = Image.new("L", (8 * scale + 2 * across, 8 * scale + 2 * down), 250)
    paper.paste(ink.point(lambda v: min(v, 250)), (across, down))
    return paper


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=Path("models/digits"))
    args = parser.parse_args()
    data = np.load(args.model / "validation.npz")
    x, y = data["x"], data["y"]
    out = args.model / "examples"
    out.mkdir(exist_ok=True)
    for i, label in enumerate(LABELS):
        row = int(np.flatnonzero(y == int(label))[0])
        image = picture(x[row])
        fmt = "JPEG" if i % 2 else "PNG"
        suffix = "jpg" if fmt == "JPEG" else "png"
        buffer = io.BytesIO()
        image.save(buffer, fmt, **({"quality": 90} if fmt == "JPEG" else {"optimize": True}))
        (out / f"{label}.{suffix}").write_bytes(buffer.getvalue())
        print(f"wrote {out / f'{label}.{suffix}'} (validation row {row})")


if __name__ == "__main__":
    main()

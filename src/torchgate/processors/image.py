"""`ImageProcessor`: encoded images to the float tensors a model was trained on.

Each image is opened with Pillow restricted to the declared formats, its declared size is
checked against `max_pixels` before a pixel is decoded (a 100-byte PNG may declare ten
billion pixels), animations are refused, and a truncated or unknown file is a 400. Then,
as `[preprocess]` declares: EXIF orientation applied, converted to `L` or `RGB`,
optionally inverted (dark ink on light paper to the light-on-dark of many datasets) and
trimmed to its content's bounding box, resized (`stretch`, `fit` inside the size with
background padding, or `cover` and centre-crop), scaled, normalised by mean and std, and
laid out CHW or HWC. Decoding is CPU work: the request path runs it in a thread.
"""

from __future__ import annotations

import base64
import binascii
import io
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from torchgate.problems import first_line
from torchgate.processors.config import ImagePreprocess
from torchgate.processors.prepared import InputRefused, Prepared
from torchgate.serving.datatypes import NUMPY

_RESAMPLE = {
    "nearest": Image.Resampling.NEAREST,
    "box": Image.Resampling.BOX,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
}
MEDIA_TYPES = {"image/jpeg": "JPEG", "image/png": "PNG", "image/webp": "WEBP"}
TRIM_THRESHOLD = 48  # grey levels from the background colour that count as content


class ImageProcessor:
    def __init__(self, config: ImagePreprocess, datatype: str) -> None:
        self.config = config
        self.dtype = NUMPY[datatype] if datatype != "BF16" else np.dtype(np.float32)
        self.media_types = tuple(m for m, f in MEDIA_TYPES.items() if f in config.formats)
        channels = config.channel_count
        shape = (channels, 1, 1) if config.layout == "CHW" else (1, 1, channels)
        self._mean = np.asarray(config.mean, dtype=np.float32).reshape(-1)
        self._std = np.asarray(config.std, dtype=np.float32).reshape(-1)
        self._mean = np.broadcast_to(self._mean, (channels,)).reshape(shape)
        self._std = np.broadcast_to(self._std, (channels,)).reshape(shape)

    def offload(self, items: list[object]) -> bool:
        return True  # decoding an image is always worth a thread

    def pad_values(self) -> None:
        return None  # images come in one size

    def prepare(self, items: list[object]) -> Prepared:
        """One tensor per item (raw bytes, or base64 text as JSON carries images)."""
        encoded = [self._bytes(item, i) for i, item in enumerate(items)]
        tensors = [self.tensor(data, i) for i, data in enumerate(encoded)]
        return Prepared([np.stack(tensors)], len(tensors), encoded)

    def _bytes(self, item: object, index: int) -> bytes:
        if isinstance(item, bytes | bytearray | memoryview):
            return bytes(item)
        if isinstance(item, str):
            try:
                return base64.b64decode(item, validate=True)
            except (binascii.Error, ValueError):
                raise InputRefused(f"image {index}: not valid base64", "bad_base64") from None
        raise InputRefused(f"image {index}: expected base64 text or bytes", "bad_image")

    def tensor(self, data: bytes, index: int = 0) -> np.ndarray:
        """One encoded image as the model's input tensor."""
        image = self._open(data, index)
        image = self._convert(image)
        background = _background(image) if self.config.trim or self.config.resize == "fit" else 0
        if self.config.trim:
            image = _trim(image, background)
        image = self._resize(image, background)
        array = np.asarray(image, dtype=np.float32)
        if array.ndim == 2:
            array = array[:, :, np.newaxis]
        if self.config.layout == "CHW":
            array = array.transpose(2, 0, 1)
        array = (array * self.config.scale - self._mean) / self._std
        return array.astype(self.dtype, copy=False)

    def _open(self, data: bytes, index: int) -> Image.Image:
        what = f"image {index}"
        formats = list(self.config.formats)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                image = Image.open(io.BytesIO(data), formats=formats)
                width, height = image.size
                if width * height > self.config.max_pixels:
                    raise InputRefused(
                        f"{what}: {width}x{height} pixels is over the limit of "
                        f"{self.config.max_pixels}",
                        "too_many_pixels",
                    )
                if getattr(image, "n_frames", 1) != 1:
                    raise InputRefused(f"{what}: animated images are not accepted", "animated")
                image.load()
        except InputRefused:
            raise
        except UnidentifiedImageError:
            shown = ", ".join(formats)
            raise InputRefused(f"{what}: not a {shown} image", "bad_image") from None
        except (Image.DecompressionBombError, Image.DecompressionBombWarning):
            # Pillow's own bound, met before ours: the header declares over 89 million
            raise InputRefused(
                f"{what}: declares too many pixels, over the limit of {self.config.max_pixels}",
                "too_many_pixels",
            ) from None
        except (OSError, ValueError, SyntaxError, EOFError) as exc:
            # truncated data, a corrupt chunk, an impossible header
            reason = first_line(exc, 120, "corrupt")
            raise InputRefused(f"{what}: cannot be decoded ({reason})", "bad_image") from None
        return image

    def _convert(self, image: Image.Image) -> Image.Image:
        image = ImageOps.exif_transpose(image)
        if image.mode in ("RGBA", "LA", "P", "PA") or "transparency" in image.info:
            # transparent pixels become white paper, not black
            rgba = image.convert("RGBA")
            paper = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            image = Image.alpha_composite(paper, rgba)
        image = image.convert(self.config.channels)
        if self.config.invert:
            image = ImageOps.invert(image)
        return image

    def _resize(self, image: Image.Image, background: int | tuple[int, ...]) -> Image.Image:
        height, width = self.config.size
        resample = _RESAMPLE[self.config.resample]
        if self.config.resize == "stretch":
            return image.resize((width, height), resample)
        if self.config.resize == "cover":
            return ImageOps.fit(image, (width, height), resample)
        # fit: inside the size, keeping the aspect ratio, padded with the background
        if image.size[0] * height == image.size[1] * width:
            return image.resize((width, height), resample)
        return ImageOps.pad(image, (width, height), resample, color=background)


def _background(image: Image.Image) -> int | tuple[int, ...]:
    """The colour of the image's border (its median), taken as the background."""
    array = np.asarray(image)
    border = np.concatenate([array[0], array[-1], array[1:-1, 0], array[1:-1, -1]])
    median = np.median(border, axis=0)
    return int(median) if np.ndim(median) == 0 else tuple(int(v) for v in median)


def _trim(image: Image.Image, background: int | tuple[int, ...]) -> Image.Image:
    """Crop to the bounding box of what differs from the background, centred on a square
    of the background so the content keeps its proportions; an image with no content is
    kept whole."""
    array = np.asarray(image).astype(np.int16)
    distance = np.abs(array - np.asarray(background, dtype=np.int16))
    if distance.ndim == 3:
        distance = distance.max(axis=2)
    content = distance > TRIM_THRESHOLD
    rows = np.flatnonzero(content.any(axis=1))
    columns = np.flatnonzero(content.any(axis=0))
    if not len(rows) or not len(columns):
        return image
    top, bottom, left, right = rows[0], rows[-1] + 1, columns[0], columns[-1] + 1
    cropped = image.crop((int(left), int(top), int(right), int(bottom)))
    side = max(cropped.size)
    square = Image.new(image.mode, (side, side), background)
    square.paste(cropped, ((side - cropped.size[0]) // 2, (side - cropped.size[1]) // 2))
    return square

"""`Prepared`: what a preprocessor hands the request path, and `InputRefused`."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from torchgate.errors import BadRequest


@dataclass(slots=True)
class Prepared:
    """The model's inputs for a request's rows, and what each row's cache key is made of
    (the encoded image or the exact text: the same input always gives the same key)."""

    inputs: list[np.ndarray]
    rows: int
    keys: list[bytes]
    tokens: int = 0  # real (unpadded) tokens, for text


class InputRefused(BadRequest):
    """A 400 from a processor, counted by `reason` (bad_image, too_many_pixels, ...)."""

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason

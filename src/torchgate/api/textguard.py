"""`TextPolicy`: limits on text (BYTES) inputs, checked after decoding, for every protocol.

Each string must decode as UTF-8 and stay within `max_length` characters. An optional
deny-list of phrases (the article's InputValidator) is matched on a normalised form of
both the phrase and the input: Unicode NFKC (full-width and compatibility letters become
plain ones), case folding, and removal of zero-width, format and whitespace characters,
so that "IGNORE previous", "ｉｇｎｏｒｅ previous" and "ig\\u200bnore pre vious" all match
"ignore previous". Look-alike letters from other scripts (Cyrillic "е") are not folded:
NFKC does not map them, and a confusables table is out of this module's scope.
"""

from __future__ import annotations

import re
import unicodedata

import numpy as np

from torchgate.errors import BadRequest

_INVISIBLE = re.compile(
    r"[\s\u00ad\u034f\u061c\u115f\u1160\u17b4\u17b5\u180b-\u180f"
    r"\u200b-\u200f\u202a-\u202e\u2060-\u206f\u3164\ufe00-\ufe0f\ufeff]+"
)


def normalize(text: str) -> str:
    """The form deny-list matching compares: NFKC, case-folded, invisibles removed."""
    folded = unicodedata.normalize("NFKC", text).casefold()
    return _INVISIBLE.sub("", folded)


class TextPolicy:
    def __init__(self, *, max_length: int, deny_phrases: list[str]) -> None:
        self.max_length = max_length
        self._phrases = [p for p in (normalize(p) for p in deny_phrases) if p]

    def check(self, array: np.ndarray, what: str) -> None:
        """Refuse (400) a text tensor with an over-long, undecodable or denied element."""
        for item in array.reshape(-1):
            if isinstance(item, bytes | bytearray | memoryview):
                try:
                    text = bytes(item).decode("utf-8")
                except UnicodeDecodeError:
                    raise BadRequest(f"{what}: text is not valid UTF-8") from None
            else:
                text = str(item)
            if len(text) > self.max_length:
                raise BadRequest(f"{what}: text longer than {self.max_length} characters")
            if self._phrases:
                plain = normalize(text)
                if any(phrase in plain for phrase in self._phrases):
                    raise BadRequest(f"{what}: input refused by the content policy")

"""`TextProcessor`: strings to token ids, attention masks and token types.

The tokenizer is a Hugging Face `tokenizer.json` beside `model.toml`, read as data by
`tokenizers` (no code from the model folder runs), with its own truncation and padding
turned off: this processor counts tokens itself. A text over the limit (the model's
`max_tokens`, never above `TORCHGATE_MAX_TOKENS`) is refused with both counts, or cut when
the model says `truncate = true`. A request's rows are padded to its longest row only;
the batcher pads a batch to its longest row the same way (`pad_values`). The text policy
(length, deny-list) runs on the raw text before it gets here.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from torchgate.processors.config import TextPreprocess
from torchgate.processors.prepared import InputRefused, Prepared
from torchgate.serving.datatypes import NUMPY

OFFLOAD_CHARS = 4096  # more text than this in one request is tokenized in a thread


class TextProcessor:
    def __init__(
        self,
        config: TextPreprocess,
        tokenizer_path: Path,
        datatypes: dict[str, str],
        order: list[str],
        *,
        max_tokens: int,
    ) -> None:
        self.config = config
        self.tokenizer = Tokenizer.from_file(str(tokenizer_path))
        self.tokenizer.no_truncation()
        self.tokenizer.no_padding()
        self.max_tokens = min(config.max_tokens, max_tokens)
        self.order = order  # the model's inputs, in signature order
        self.dtypes = {name: NUMPY[datatypes[name]] for name in order}
        pad = self.tokenizer.token_to_id("[PAD]")
        if pad is None:
            pad = self.tokenizer.token_to_id("<pad>")
        self.pad_id = pad if pad is not None else 0
        self.media_types: tuple[str, ...] = ()

    def pad_values(self) -> list[int]:
        """What each model input is padded with to the longest row of a batch."""
        return [self.pad_id if name == self.config.input_ids else 0 for name in self.order]

    def lengths(self, inputs: list[np.ndarray]) -> np.ndarray:
        """Each row's real tokens in the model inputs this processor made (right-padded)."""
        if self.config.attention_mask:
            mask = inputs[self.order.index(self.config.attention_mask)]
            return np.count_nonzero(mask, axis=1)
        ids = inputs[self.order.index(self.config.input_ids)]
        return np.count_nonzero(ids != self.pad_id, axis=1)

    def offload(self, items: list[object]) -> bool:
        return sum(len(i) for i in items if isinstance(i, str | bytes)) > OFFLOAD_CHARS

    def prepare(self, items: list[object]) -> Prepared:
        texts = [self._text(item, i) for i, item in enumerate(items)]
        encodings = self.tokenizer.encode_batch(texts)
        lengths = [len(e.ids) for e in encodings]
        for i, n in enumerate(lengths):
            if n > self.max_tokens:
                if not self.config.truncate:
                    raise InputRefused(
                        f"text {i}: {n} tokens, over this model's limit of {self.max_tokens}",
                        "too_many_tokens",
                    )
                lengths[i] = self.max_tokens
        longest = max(lengths, default=0) or 1
        ids = np.full((len(texts), longest), self.pad_id, dtype=np.int64)
        mask = np.zeros((len(texts), longest), dtype=np.int64)
        types = np.zeros((len(texts), longest), dtype=np.int64)
        for row, (encoding, n) in enumerate(zip(encodings, lengths, strict=True)):
            ids[row, :n] = encoding.ids[:n]
            mask[row, :n] = 1
            types[row, :n] = encoding.type_ids[:n]
        by_name = {self.config.input_ids: ids}
        if self.config.attention_mask:
            by_name[self.config.attention_mask] = mask
        if self.config.token_type_ids:
            by_name[self.config.token_type_ids] = types
        inputs = [by_name[name].astype(self.dtypes[name], copy=False) for name in self.order]
        keys = [t.encode("utf-8") for t in texts]
        return Prepared(inputs, len(texts), keys, tokens=sum(lengths))

    def prepare_ids(self, rows: list[list[int]]) -> Prepared:
        """Token ids a client made itself: checked against the vocabulary and the limit,
        then padded and masked as texts are (no token types: all 0)."""
        vocabulary = self.tokenizer.get_vocab_size()
        for i, row in enumerate(rows):
            if len(row) > self.max_tokens:
                raise InputRefused(
                    f"input {i}: {len(row)} tokens, over this model's limit of {self.max_tokens}",
                    "too_many_tokens",
                )
            if any(t < 0 or t >= vocabulary for t in row):
                raise InputRefused(
                    f"input {i}: token ids must be between 0 and {vocabulary - 1}", "bad_tokens"
                )
        longest = max((len(r) for r in rows), default=1)
        ids = np.full((len(rows), longest), self.pad_id, dtype=np.int64)
        mask = np.zeros((len(rows), longest), dtype=np.int64)
        for i, row in enumerate(rows):
            ids[i, : len(row)] = row
            mask[i, : len(row)] = 1
        by_name = {self.config.input_ids: ids}
        if self.config.attention_mask:
            by_name[self.config.attention_mask] = mask
        if self.config.token_type_ids:
            by_name[self.config.token_type_ids] = np.zeros_like(ids)
        inputs = [by_name[name].astype(self.dtypes[name], copy=False) for name in self.order]
        keys = [b"ids:" + np.asarray(row, dtype="<i8").tobytes() for row in rows]
        return Prepared(inputs, len(rows), keys, tokens=sum(len(r) for r in rows))

    @staticmethod
    def _text(item: object, index: int) -> str:
        if isinstance(item, str):
            return item
        if isinstance(item, bytes | bytearray | memoryview):
            try:
                return bytes(item).decode("utf-8")
            except UnicodeDecodeError:
                raise InputRefused(f"text {index}: not valid UTF-8", "bad_text") from None
        raise InputRefused(f"text {index}: expected a string", "bad_text")

"""The sentences `make bench-embeddings` sends (owns building them): real English prose from
the docstrings of this Python's standard library, the same on every machine with the same
Python.

Docstrings are read with `ast` (nothing is imported or run), split into sentences, cleaned
of markup, and kept when they read as prose (mostly letters, at least five words) and
measure 8 to 200 tokens with the model's tokenizer; duplicates go. The spread is the
usual one of real text: mostly short, a long tail.
"""

from __future__ import annotations

import ast
import random
import re
import sysconfig
from pathlib import Path

from tokenizers import Tokenizer

_SENTENCE = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")
_SPACE = re.compile(r"\s+")
_MARKUP = re.compile(r"[`*|]|:[a-z]+:|>>>")


def _docstrings(path: Path) -> list[str]:
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"))
    except (SyntaxError, UnicodeDecodeError, ValueError, OSError):
        return []
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            text = ast.get_docstring(node)
            if text:
                found.append(text)
    return found


def _prose(sentence: str) -> bool:
    words = sentence.split()
    letters = sum(c.isalpha() or c == " " for c in sentence)
    return len(words) >= 5 and letters >= 0.85 * len(sentence) and sentence[-1] in ".!?"


def sentences(tokenizer: Tokenizer, *, limit: int | None = None, seed: int = 0) -> list[str]:
    """Prose sentences of 8 to 200 tokens, shuffled with `seed`; at most `limit`."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    seen: set[str] = set()
    kept: list[str] = []
    for path in sorted(stdlib.rglob("*.py")):
        if "site-packages" in path.parts or "test" in path.parts or "tests" in path.parts:
            continue
        for text in _docstrings(path):
            for paragraph in text.split("\n\n"):
                flat = _SPACE.sub(" ", _MARKUP.sub("", paragraph)).strip()
                for sentence in _SENTENCE.split(flat):
                    sentence = sentence.strip()
                    if sentence in seen or not _prose(sentence):
                        continue
                    seen.add(sentence)
                    kept.append(sentence)
    counts = [len(e.ids) for e in tokenizer.encode_batch(kept)]
    kept = [s for s, n in zip(kept, counts, strict=True) if 8 <= n <= 200]
    random.Random(seed).shuffle(kept)
    return kept[:limit] if limit else kept


def token_counts(tokenizer: Tokenizer, texts: list[str]) -> list[int]:
    return [len(e.ids) for e in tokenizer.encode_batch(texts)]

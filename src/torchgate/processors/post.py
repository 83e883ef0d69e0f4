"""`Postprocessor`: what V1 and the embeddings API answer with, from the first output.

Declared in `[postprocess]`: `softmax` turns logits into probabilities, `top_k` names the
k best classes of each row with their probabilities (labels from `model.toml`),
`l2_normalize` scales embeddings to unit length. A model with labels and no
`[postprocess]` answers each row's top label and its probability, as it always has. V2
answers the model's raw outputs.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from torchgate.processors.config import PostprocessConfig


def softmax(scores: np.ndarray) -> np.ndarray:
    shifted = scores - scores.max(axis=-1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=-1, keepdims=True)


def l2_normalize(vectors: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(vectors, axis=-1, keepdims=True)
    return vectors / np.maximum(norms, 1e-12)


class Postprocessor:
    def __init__(self, config: PostprocessConfig, labels: tuple[str, ...] | None) -> None:
        self.config = config
        self.labels = labels

    def predictions(self, first: np.ndarray) -> np.ndarray:
        """The first output as answered: probabilities, unit vectors, or as it came."""
        values = first.astype(np.float32, copy=False)
        if self.config.softmax:
            return softmax(values)
        if self.config.l2_normalize:
            return l2_normalize(values)
        return first

    def top(self, first: np.ndarray) -> dict[str, Any]:
        """Each row's `top_k` labels and their probabilities (k of each per row)."""
        k = self.config.top_k
        if k is None or self.labels is None:
            return {}
        scores = first.reshape(first.shape[0], -1).astype(np.float32, copy=False)
        probabilities = scores if _probabilities(scores) else softmax(scores)
        best = np.argsort(-probabilities, axis=1, kind="stable")[:, :k]
        labels = self.labels
        return {
            "labels": [[labels[i] for i in row] for row in best.tolist()],
            "probabilities": np.take_along_axis(probabilities, best, axis=1),
        }


def _probabilities(scores: np.ndarray) -> bool:
    return bool(scores.min() >= 0 and np.abs(scores.sum(axis=1) - 1).max() < 1e-3)

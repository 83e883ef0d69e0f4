"""`top_classes`: each output row's top class and its probability, for models with labels.

The batcher runs it once per forward in its runner thread, vectorized over the batch, so
the event loop does not do it row by row; the service runs it only for answers assembled
from the cache.
"""

from __future__ import annotations

import math

import numpy as np


def top_classes(outputs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each row's top class and its probability. Outputs that already look like
    probabilities (non-negative, rows summing to 1) are kept; logits are soft-maxed."""
    scores = outputs.reshape(outputs.shape[0], -1)
    if scores.shape[0] == 1:  # a single row (a cache hit, mostly): plain Python is cheaper
        row = scores[0].tolist()
        best = max(row)
        index = row.index(best)
        if min(row) >= 0 and abs(sum(row) - 1) < 1e-3:
            return np.array([index]), np.array([best])
        return np.array([index]), np.array([1.0 / sum(math.exp(v - best) for v in row)])
    top = scores.argmax(axis=1)
    best = scores[np.arange(len(top)), top].astype(np.float64)
    if scores.min() >= 0 and np.abs(scores.sum(axis=1) - 1).max() < 1e-3:
        return top, best
    # softmax of the top entry alone: 1 / sum(exp(x - max))
    return top, 1.0 / np.exp(scores - best[:, None]).sum(axis=1)

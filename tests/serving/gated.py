"""`GatedModel`, a fake model for batcher tests, and `FakeClock`.

The batcher needs only a model's forward signature (`serving.execution.Forward`). This one
doubles its input, and every forward waits at a gate until the test lets it through, so a
test knows when a forward has started, on which rows, and decides when it ends: no sleep
decides what a batch holds. A row holding `POISON` fails its forward; `broken` fails every
forward, known-good input included, as a model whose state went bad.
"""

from __future__ import annotations

import asyncio
import queue
import threading

import numpy as np

from torchgate.serving.model_config import ModelConfig

POISON = 666.0


class GatedModel:
    key = "fake/1"

    def __init__(self, max_batch_size: int = 4) -> None:
        self.config = ModelConfig(
            max_batch_size=max_batch_size,
            inputs=({"name": "x", "datatype": "FP32", "shape": (4,)},),
            outputs=({"name": "y", "datatype": "FP32", "shape": (4,)},),
        )
        self.broken = False
        self.forwards: list[list[float]] = []  # the first value of each row, per forward
        self._started: queue.SimpleQueue[list[float]] = queue.SimpleQueue()
        self._permits = threading.Semaphore(0)
        self._open = threading.Event()

    def forward(self, inputs: list[np.ndarray], instance: int = 0) -> list[np.ndarray]:
        x = inputs[0]
        firsts = [float(v) for v in x[:, 0]]
        self.forwards.append(firsts)
        self._started.put(firsts)
        if not self._open.is_set() and not self._permits.acquire(timeout=30):
            raise RuntimeError("the test never let this forward through")
        if self.broken:
            raise RuntimeError("the model is broken")
        if bool((x == POISON).any()):
            raise RuntimeError("poisoned input")
        return [x * 2]

    async def started(self) -> list[float]:
        """Wait until the next forward starts; the first value of each of its rows."""
        return await asyncio.to_thread(self._started.get, True, 10)

    def let_through(self, forwards: int = 1) -> None:
        self._permits.release(forwards)

    def open(self) -> None:
        """Let every forward through, those waiting and those to come."""
        self._open.set()
        self._permits.release(1000)


class FakeClock:
    """A batcher's clock that moves only when the test moves it."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds

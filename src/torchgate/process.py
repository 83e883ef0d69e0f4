"""`ProcessTuning`: the process-wide settings torchgate changes, set in one place and put
back in one place.

They are torch's intra-op threads (the setting, or half the cores so that the event loop
keeps one), the thread switch interval (a runner thread back from a forward, run with the
GIL released, waits up to one interval for the event loop to hand the GIL over; Python's
default of 5 ms slows the forwards down under load, see the README's Benchmark section),
and the garbage collector's thresholds and freeze (`memory.settle`, once the models are
loaded). The CLI applies them before it loads the models, so that loads and warm-ups run
as serving will; the app's lifespan applies them again (an app built without the CLI
needs them as much) and restores what it found when it stops.
"""

from __future__ import annotations

import gc
import os
import sys
from types import TracebackType

import torch

from torchgate import memory
from torchgate.config import Settings


def torch_threads(settings: Settings) -> int:
    """Intra-op threads: the setting, or half the cores so the event loop keeps one."""
    if settings.torch_threads:
        return settings.torch_threads
    return max(1, (os.cpu_count() or 2) // 2)


class ProcessTuning:
    """Applies a `Settings`' process-wide values (`apply`, or `with`); `restore` puts back
    what `apply` found, and unfreezes what `settle` froze."""

    def __init__(self, settings: Settings) -> None:
        self.torch_threads = torch_threads(settings)
        self.switch_interval_s = settings.gil_switch_ms / 1000
        self._saved: tuple[int, float, tuple[int, ...]] | None = None
        self._settled = False

    def apply(self) -> None:
        self._saved = (torch.get_num_threads(), sys.getswitchinterval(), gc.get_threshold())
        torch.set_num_threads(self.torch_threads)
        sys.setswitchinterval(self.switch_interval_s)

    def settle(self) -> None:
        """Once the models are loaded: freeze what is alive out of the collector."""
        memory.settle()
        self._settled = True

    def restore(self) -> None:
        if self._saved is None:
            return
        threads, interval, thresholds = self._saved
        self._saved = None
        torch.set_num_threads(threads)
        sys.setswitchinterval(interval)
        gc.set_threshold(*thresholds)
        if self._settled:
            gc.unfreeze()
            self._settled = False

    def __enter__(self) -> ProcessTuning:
        self.apply()
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.restore()

"""How torchgate uses Python's garbage collector and the C allocator.

Everything alive once the models are loaded (torch, the models, the app) lives as long as
the process. `settle()` moves it out of the collector's reach (`gc.freeze()`), or every
full collection would walk it all and stall the event loop, and makes young collections
rarer, since every request allocates a few hundred objects (what that buys is in the
README's Benchmark section).

Frozen objects are never collected, so when a model version is unloaded `release()`
thaws everything, collects (about 0.1 s with torch loaded, once per load or unload), and
freezes what survives again: an unloaded version's memory is really given back. When the
caller can tell that what it dropped is gone already (`release(watched)`: weak references
to it, all dead), reference counting freed it and the collection is skipped: an eviction
to make room for another model then costs no pause of the event loop.

Memory freed is handed back to the operating system (`malloc_trim`, glibc only): glibc
otherwise keeps freed heap pages for reuse, and a process that evicted a model would go
on holding its pages, so that its resident memory would not show what it holds. The
same holds after a flood of connections (each with its buffers), so `trim()` also runs
every `TRIM_EVERY_S` seconds (a few milliseconds each).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import gc
import weakref
from collections.abc import Callable, Iterable

# gen0 every 50,000 net allocations (Python's default is 700), gen1 every 20 of those,
# gen2 every 100 gen1: cyclic garbage is still collected, a few MB at most in between
THRESHOLDS = (50_000, 20, 100)


def settle() -> None:
    """Collect once, freeze the survivors, and set torchgate's thresholds."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*THRESHOLDS)


TRIM_EVERY_S = 5.0


def release(watched: Iterable[weakref.ref[object]] | None = None) -> bool:
    """Free what an unload left unreachable, frozen or not, then freeze the rest again;
    with `watched`, only when one of them is still alive (held in a reference cycle).
    Returns whether everything watched is gone."""
    refs = list(watched or ())
    if watched is None or any(ref() is not None for ref in refs):
        gc.unfreeze()
        gc.collect()
        gc.freeze()
    trim()
    return all(ref() is None for ref in refs)


def trim() -> None:
    """Give the C heap's free pages back to the operating system (glibc; elsewhere a no-op)."""
    malloc_trim = _malloc_trim()
    if malloc_trim is not None:
        malloc_trim(0)


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to trim
        return None

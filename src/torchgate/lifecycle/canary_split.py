"""`CallerRuns`: the canary split, each caller's requests sent to one side in runs.

`weight` is the share of requests (those that name no version) that go to the canary,
whatever the number of callers. Each caller (API key name, or client address) has a place
in [0, 1) for the rollout (`bucket`: BLAKE2b of the model, version and caller, stable
across processes and restarts, unlike `hash()`), and its requests are counted in runs of
`RUN` (10): run r goes to the canary when `floor(place + (r + 1) * weight)` passes an
integer that `floor(place + r * weight)` did not. So a caller sending fewer than 10
requests sees one version, a busier one sees runs of 10 on one version, and each caller's
requests, one caller or thousands, go to the canary in the weight's share. Raising the
weight moves a caller's first run only towards the canary. The counts are kept for the
last `MAX_CALLERS` callers.
"""

from __future__ import annotations

import hashlib
import math
from collections import OrderedDict

RUN = 10  # a caller's requests go to one side in runs of this many
MAX_CALLERS = 10_000  # callers whose counts are kept; the least recent are forgotten
_SCALE = float(2**64)


def bucket(identity: str, salt: str) -> float:
    """A caller's stable place in [0, 1) for one rollout."""
    digest = hashlib.blake2b(f"{salt}\0{identity}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / _SCALE


class CallerRuns:
    """Each recent caller's place and count of requests, for the rollout `salt` names."""

    __slots__ = ("_callers", "salt")

    def __init__(self, salt: str) -> None:
        self.salt = salt
        self._callers: OrderedDict[str, list[float]] = OrderedDict()  # place, requests

    def __len__(self) -> int:
        return len(self._callers)

    def to_canary(self, identity: str, weight: float) -> bool:
        """Whether this request of the caller's goes to the canary (counted)."""
        entry = self._callers.get(identity)
        if entry is None:
            entry = self._callers[identity] = [bucket(identity, self.salt), 0]
            if len(self._callers) > MAX_CALLERS:
                self._callers.popitem(last=False)
        else:
            self._callers.move_to_end(identity)
        place, count = entry
        entry[1] = count + 1
        start = place + count // RUN * weight
        return math.floor(start + weight) > math.floor(start)

    def reset(self, salt: str) -> None:
        """Another rollout: new places, counts from zero."""
        self.salt = salt
        self._callers.clear()

"""`FailOpen`: a shared backend (Redis) that requests are served without while it fails.

The rate limiter's counters and the cache's shared tier both live in Redis when one is
configured, and neither may take the server down with it: after a failure the backend is
skipped for `retry_s`, so a Redis that is down costs one timeout a second rather than one
per request; every failure is counted, and a warning is logged once per stretch of
failures rather than on each.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from prometheus_client import Counter

RETRY_S = 1.0
QUIET_S = 5.0  # failures this close to the last retry time continue a stretch: no new warning


class FailOpen:
    """Whether to try a shared backend now, and what a failure of it does."""

    __slots__ = ("clock", "errors", "log", "retry_s", "warning", "_retry_at")

    def __init__(
        self,
        errors: Counter,
        log: logging.Logger,
        warning: str,
        *,
        retry_s: float = RETRY_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.errors = errors
        self.log = log
        self.warning = warning
        self.retry_s = retry_s
        self.clock = clock
        self._retry_at = 0.0

    @property
    def up(self) -> bool:
        """Whether to try the backend: no failure within the last `retry_s`."""
        return self.clock() >= self._retry_at

    def failed(self, error: str) -> None:
        """Count a failure, warn unless it continues a stretch, and rest the backend."""
        self.errors.inc()
        if self._retry_at == 0.0 or self.clock() - self._retry_at > QUIET_S:
            self.log.warning(self.warning, extra={"error": error})
        self._retry_at = self.clock() + self.retry_s

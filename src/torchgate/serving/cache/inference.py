"""`InferenceCache`: every served version's cache, and the shared tier they all use."""

from __future__ import annotations

import time
from collections.abc import Callable

from torchgate.metrics import Metrics
from torchgate.serving.cache.shared import SharedTier
from torchgate.serving.cache.version import VersionCache
from torchgate.serving.model import LoadedModel


class InferenceCache:
    """Every version's cache, and the shared tier they all use."""

    def __init__(
        self,
        metrics: Metrics,
        *,
        redis_url: str | None = None,
        ttl_override_s: float | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.metrics = metrics
        self.ttl_override_s = ttl_override_s
        self.clock = clock
        self.shared = SharedTier(redis_url, metrics, clock) if redis_url else None
        self._versions: dict[str, dict[int, VersionCache]] = {}

    def for_version(self, model: LoadedModel) -> VersionCache:
        config = model.config.cache
        ttl = self.ttl_override_s if self.ttl_override_s is not None else config.ttl_s
        cache = VersionCache(
            model,
            ttl_s=ttl,
            max_entries=config.max_entries,
            shared=self.shared,
            metrics=self.metrics,
            clock=self.clock,
        )
        versions = self._versions.setdefault(model.name, {})
        versions[model.version] = cache
        self.metrics.cache_entries.labels(model.name).set_function(
            lambda: sum(len(c) for c in versions.values())
        )
        return cache

    def drop(self, model: LoadedModel) -> None:
        """Forget a version's entries (on unload or reload)."""
        versions = self._versions.get(model.name, {})
        cache = versions.get(model.version)
        if cache is not None and cache.model is model:
            cache.clear()
            del versions[model.version]

    async def aclose(self) -> None:
        if self.shared is not None:
            await self.shared.aclose()

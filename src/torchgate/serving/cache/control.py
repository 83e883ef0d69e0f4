"""`CachePolicy`: what a request's `Cache-Control` header allows the cache to do."""

from __future__ import annotations

from enum import Enum


class CachePolicy(Enum):
    """What the client's `Cache-Control` allows."""

    USE = "use"  # read and write
    REFRESH = "no-cache"  # skip the lookup, store the fresh result
    BYPASS = "no-store"  # neither read nor write

    @classmethod
    def from_header(cls, value: str | None) -> CachePolicy:
        if not value:
            return cls.USE
        directives = {d.strip().lower() for d in value.split(",")}
        if "no-store" in directives:
            return cls.BYPASS
        if "no-cache" in directives or "max-age=0" in directives:
            return cls.REFRESH
        return cls.USE

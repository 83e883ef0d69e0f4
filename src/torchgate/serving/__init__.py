"""The serving core: model repository, router, cache, breaker, batcher and runner."""

"""`ModelRegistry` and `InferenceService` without HTTP: what is served, how a request
finds its version, reloads that keep what did not change, unloads, and the request path
(cache, breaker, batcher) behind every protocol."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
from prometheus_client import CollectorRegistry
from torch import nn

from tests.support import Doubler, doubler_toml, write_model
from torchgate.config import Settings
from torchgate.errors import CircuitOpen, Draining, ModelNotFound
from torchgate.lifecycle.rollout_state import RolloutState, open_store
from torchgate.metrics import Metrics
from torchgate.serving.admission import admit_all
from torchgate.serving.cache import InferenceCache
from torchgate.serving.registry import ModelRegistry
from torchgate.serving.repository import ModelRepository
from torchgate.serving.service import InferenceService


class Tripler(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * 3


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    write_model(tmp_path, "doubler", Doubler(), doubler_toml(), versions=(1, 2))
    return tmp_path


@asynccontextmanager
async def serving(
    repo: Path, settings: Settings, draining: Callable[[], bool] = lambda: False
) -> AsyncIterator[tuple[ModelRegistry, InferenceService, Metrics]]:
    """What the app's lifespan builds, without the app."""
    metrics = Metrics(CollectorRegistry(), version="test")
    repository = ModelRepository(repo, "cpu")
    state = RolloutState(open_store(repository.root, None))
    registry = ModelRegistry(repository, settings, metrics, InferenceCache(metrics), state)
    for admission in (await asyncio.to_thread(admit_all, repository, state.read)).values():
        registry.install(admission)
    registry.start()
    try:
        yield registry, InferenceService(registry, metrics, draining=draining), metrics
    finally:
        await registry.aclose()


def run(repo: Path, settings: Settings, body: Callable[..., Awaitable[None]], **kw) -> None:
    async def main() -> None:
        async with serving(repo, settings, **kw) as (registry, service, metrics):
            await body(registry, service, metrics)

    asyncio.run(main())


def rows(*values: float) -> np.ndarray:
    return np.array([[v, 1, 2, 3] for v in values], dtype=np.float32)


def test_a_request_finds_the_default_version_or_the_one_it_names(repo, make_settings):
    async def body(registry, service, metrics):
        assert registry.names() == ["doubler"] and "doubler" in registry
        assert registry.resolve("doubler").version == 2  # latest
        assert registry.resolve("doubler", "1").version == 1
        assert registry.default_model() == "doubler"
        with pytest.raises(ModelNotFound, match="model doubler has no version 7"):
            registry.resolve("doubler", 7)
        with pytest.raises(ModelNotFound, match="unknown model absent"):
            registry.resolve("absent")
        with pytest.raises(ModelNotFound, match=r"unknown model \(invalid name\)"):
            registry.resolve("../../etc/passwd")

    run(repo, make_settings(models=repo), body)


def test_a_reload_keeps_unchanged_versions_and_replaces_changed_ones(repo, make_settings):
    async def body(registry, service, metrics):
        one, two = registry.resolve("doubler", 1), registry.resolve("doubler", 2)
        await registry.load("doubler")
        assert registry.resolve("doubler", 1) is one and registry.resolve("doubler", 2) is two
        torch.jit.script(Tripler()).save(str(repo / "doubler" / "2" / "model.pt"))
        await registry.load("doubler")
        assert registry.resolve("doubler", 1) is one
        changed = registry.resolve("doubler", 2)
        assert changed is not two and not two.batcher.accepting  # the old one was stopped
        result = await service.infer(changed, [rows(1)], 1)
        np.testing.assert_array_equal(result.outputs[0], rows(1) * 3)

    run(repo, make_settings(models=repo, cache_ttl_s=0), body)


def test_an_unloaded_model_is_not_served(repo, make_settings):
    async def body(registry, service, metrics):
        served = registry.resolve("doubler")
        await registry.unload("doubler")
        assert registry.names() == [] and not served.batcher.accepting
        with pytest.raises(ModelNotFound):
            registry.resolve("doubler")
        assert metrics.registry.get_sample_value("torchgate_models_loaded") == 0

    run(repo, make_settings(models=repo), body)


def test_the_service_answers_from_the_batcher_then_from_the_cache(repo, make_settings):
    async def body(registry, service, metrics):
        served = registry.resolve("doubler")
        first = await service.infer(served, [rows(1, 2)], 2)
        np.testing.assert_array_equal(first.outputs[0], rows(1, 2) * 2)
        assert first.cache == "MISS" and first.served is served
        again = await service.infer(served, [rows(2, 1)], 2)
        assert again.cache == "HIT"
        np.testing.assert_array_equal(again.outputs[0], rows(2, 1) * 2)

    run(repo, make_settings(models=repo), body)


def test_an_open_circuit_refuses_before_the_batcher(repo, make_settings):
    async def body(registry, service, metrics):
        served = registry.resolve("doubler")
        for _ in range(2):  # the model's own failures (not an input's)
            served.breaker.allow()
            served.breaker.failure()
        with pytest.raises(CircuitOpen):
            await service.infer(served, [rows(1)], 1)
        shed = metrics.registry.get_sample_value(
            "torchgate_shed_total", {"model": "doubler", "reason": "circuit_open"}
        )
        assert shed == 1
        assert registry.open_circuits() == ["doubler/2"]

    run(repo, make_settings(models=repo, breaker_failures=2, cache_ttl_s=0), body)


def test_a_draining_server_refuses_new_work(repo, make_settings):
    async def body(registry, service, metrics):
        with pytest.raises(Draining):
            await service.infer(registry.resolve("doubler"), [rows(1)], 1)

    run(repo, make_settings(models=repo), body, draining=lambda: True)

"""Shared fixtures: settings for temporary repositories and running servers."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.support import MODELS, Doubler, ServerThread, doubler_toml, write_model
from torchgate.config import Settings


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    for key in list(os.environ):
        if key.startswith("TORCHGATE_"):
            monkeypatch.delenv(key)


@pytest.fixture
def make_settings() -> Callable[..., Settings]:
    def make(models: Path = MODELS, **overrides: object) -> Settings:
        overrides.setdefault("auth", "off")
        overrides.setdefault("rate_limit", "off")
        if models == MODELS:  # `make bench` may have added models/mlp_wide beside digits
            overrides.setdefault("default_model", "digits")
        return Settings(models=models, device="cpu", **overrides)

    return make


@pytest.fixture
def doubler_repo(tmp_path: Path) -> Path:
    write_model(tmp_path, "doubler", Doubler(), doubler_toml())
    return tmp_path


@pytest.fixture
def digits_server(make_settings: Callable[..., Settings]) -> Iterator[ServerThread]:
    with ServerThread(make_settings()) as server:
        yield server

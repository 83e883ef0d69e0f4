"""`ModelRepository`: model folders on disk, read, checked and loaded, or refused with the
file and the problem named."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest

from tests.support import Doubler, doubler_toml, write_model
from torchgate.errors import ModelLoadError
from torchgate.serving.repository import ModelRepository


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    write_model(tmp_path, "doubler", Doubler(), doubler_toml(max_batch_size=4), versions=(1, 3))
    return tmp_path


def test_names_versions_and_the_default_version(repo: Path):
    (repo / "notes").mkdir()  # a folder without model.toml is not a model
    models = ModelRepository(repo, "cpu")
    assert models.names() == ["doubler"]
    assert models.versions("doubler") == [1, 3]
    folder = models.load("doubler")
    assert folder.default_version == 3  # "latest"
    x = np.ones((2, 4), dtype=np.float32)
    np.testing.assert_array_equal(folder.versions[1].forward([x])[0], x * 2)


def test_a_version_loads_from_the_bytes_it_hashed(repo: Path):
    models = ModelRepository(repo, "cpu")
    config = models.read_config("doubler")
    data = (repo / "doubler" / "1" / "model.pt").read_bytes()
    loaded = models.load_version("doubler", 1, config)
    assert loaded.sha256 == hashlib.sha256(data).hexdigest() == models.digest("doubler", 1)


def test_a_pinned_digest_that_does_not_match_refuses_the_version(repo: Path):
    toml = repo / "doubler" / "model.toml"
    toml.write_text(f'sha256 = {{ "1" = "{"0" * 64}" }}\n' + toml.read_text())
    models = ModelRepository(repo, "cpu")
    with pytest.raises(ModelLoadError, match="does not match the pinned 0000"):
        models.load_version("doubler", 1, models.read_config("doubler"))


@pytest.mark.parametrize(
    ("name", "problem"),
    [
        ("../etc", "model names are"),
        ("Doubler", "model names are"),
        ("absent", "no model.toml"),
    ],
)
def test_a_bad_model_name_is_refused(repo: Path, name: str, problem: str):
    with pytest.raises(ModelLoadError, match=problem):
        ModelRepository(repo, "cpu").folder(name)


def test_a_model_folder_linked_outside_the_repository_is_refused(repo: Path, tmp_path_factory):
    outside = tmp_path_factory.mktemp("outside")
    write_model(outside, "elsewhere", Doubler(), doubler_toml())
    (repo / "elsewhere").symlink_to(outside / "elsewhere")
    with pytest.raises(ModelLoadError, match="resolves outside the model repository"):
        ModelRepository(repo, "cpu").read_config("elsewhere")


def test_problems_name_the_file(repo: Path):
    models = ModelRepository(repo, "cpu")
    (repo / "doubler" / "model.toml").write_text("max_batch_size = [")
    with pytest.raises(ModelLoadError, match=r"model\.toml: not valid TOML"):
        models.read_config("doubler")
    (repo / "doubler" / "model.toml").write_text(doubler_toml())
    (repo / "doubler" / "3" / "model.pt").write_bytes(b"not a zip archive")
    with pytest.raises(ModelLoadError, match=r"3/model\.pt: not a loadable TorchScript archive"):
        models.load("doubler")
    empty = repo / "empty"
    empty.mkdir()
    (empty / "model.toml").write_text(doubler_toml())
    with pytest.raises(ModelLoadError, match="no version folder with a model.pt"):
        models.versions("empty")


def test_a_repository_that_is_not_a_directory_says_so(tmp_path: Path):
    with pytest.raises(ModelLoadError, match="model repository is not a directory"):
        ModelRepository(tmp_path / "missing", "cpu").names()


def test_the_estimate_is_the_size_of_the_version_files(repo: Path):
    models = ModelRepository(repo, "cpu")
    files = [repo / "doubler" / v / "model.pt" for v in ("1", "3")]
    assert models.estimate("doubler") == {"cpu": sum(f.stat().st_size for f in files)}

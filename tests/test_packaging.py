"""Installing torchgate prints no deprecation banner of the build backend's about the
project's own metadata (it printed setuptools' `project.license` one three times)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support import ROOT

pytestmark = pytest.mark.slow  # every test here takes a second or more


def test_building_the_package_prints_no_deprecation(tmp_path: Path):
    project = tmp_path / "project"
    project.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, project / name)
    shutil.copytree(ROOT / "src", project / "src", ignore=shutil.ignore_patterns("*.egg-info"))
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-v", "--no-deps", "--no-build-isolation"]
        + ["-w", str(tmp_path / "dist"), str(project)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    output = built.stdout + built.stderr
    assert built.returncode == 0, output[-3000:]
    assert list((tmp_path / "dist").glob("torchgate-*.whl"))
    for banner in ("is deprecated", "DeprecationWarning", "BuildBackendWarning"):
        assert banner not in output, output[output.find(banner) - 500 :][:1500]

"""The README's canary example, run as written: its curl lines against a server of the
digits model with the int8 version 2 the README's quantize step writes."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support import ROOT, copy_digits, run_cli, server_process

pytestmark = pytest.mark.slow  # every test here takes a second or more

README = ROOT / "README.md"


def canary_block() -> list[str]:
    """The lines of the README's bash block that follows "By hand (admin key"."""
    text = README.read_text()
    start = text.index("By hand (admin key")
    block = re.search(r"```bash\n(.*?)```", text[start:], re.DOTALL)
    assert block, "the README's canary example has no bash block"
    return [line for line in block.group(1).splitlines() if line.strip()]


def test_the_readme_canary_example_works_as_written(tmp_path: Path):
    lines = canary_block()
    setup, serve, curls = lines[:2], lines[2], lines[3:]
    assert setup[0].startswith(".venv/bin/python scripts/quantize_digits.py")
    assert setup[1].startswith("sed -i ")
    assert serve.startswith('make serve SERVE_ARGS="--device cpu"')
    assert curls and all(line.startswith("curl ") for line in curls)

    # the setup lines run as written, in a checkout of the digits model made for the test
    copy_digits(tmp_path / "models")
    (tmp_path / ".venv").symlink_to(Path(sys.executable).parents[1])
    (tmp_path / "scripts").symlink_to(ROOT / "scripts")
    for line in setup:
        done = subprocess.run(
            ["bash", "-c", line], cwd=tmp_path, capture_output=True, text=True, timeout=300
        )
        assert done.returncode == 0, (line, done.stdout, done.stderr)
    repo = tmp_path / "models"
    assert (repo / "digits" / "2" / "model.pt").is_file()
    keys = tmp_path / "keys.toml"
    made = run_cli("keys", "new", "--name", "dev", "--scope", "admin", "--keys-file", str(keys))
    key = made.stdout.split("key (shown once, store it now): ")[1].split()[0]
    auth = f"Authorization: Bearer {key}"
    # what `make serve SERVE_ARGS="--device cpu"` runs, with a key of the same scope
    args = ("--models", str(repo), "--device", "cpu", "--api-keys-file", str(keys))
    with server_process(*args) as (_, url):
        env = {**os.environ, "AUTH": auth, "J": "content-type: application/json"}
        answers = []
        for line in curls:
            command = line.replace("localhost:8000", url.removeprefix("http://"))
            done = subprocess.run(
                ["bash", "-c", command], env=env, capture_output=True, text=True, timeout=60
            )
            assert done.returncode == 0, done.stderr
            answer = json.loads(done.stdout)
            assert "error" not in answer, (line, answer)
            answers.append(answer)
    state, started, weighted, drift = answers
    assert state == {"model": "digits", "status": "none", "stable_version": 1}
    assert started["version"] == 2 and started["weight"] == 0.1
    assert weighted["version"] == 2 and weighted["weight"] == 0.5
    assert drift["model"] == "digits"

"""`torchgate validate`, the CI accuracy gate, and `scripts/quantize_digits.py`, which makes
an int8 digits version 2 and runs the gate on both versions."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.lifecycle.test_validation import Constant
from tests.support import ROOT, copy_digits, run_cli
from torchgate import cli


@pytest.fixture
def digits(tmp_path: Path) -> Path:
    return copy_digits(tmp_path)


def validate(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = cli.main(["validate", *args])
    out, err = capsys.readouterr()
    return code, out, err


def write_constant(folder: Path, version: int) -> None:
    (folder / str(version)).mkdir()
    torch.jit.script(Constant()).save(str(folder / str(version) / "model.pt"))


@pytest.mark.slow
def test_the_command_passes_the_bundled_model(digits: Path):
    result = run_cli("validate", str(digits))
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert re.search(r"accuracy\s+0\.9\d+\s+\(min 0\.95\)", out)
    assert re.search(r"latency\s+\d+\.\d+ ms/row \(batches of 64\)", out)
    assert "model size    153,128 bytes" in out
    assert re.search(r"recall\s+0:1\.000\s+1:0\.\d+", out)
    assert out.strip().endswith("digits version 1: PASS")


def test_a_broken_version_fails(digits: Path, capsys):
    write_constant(digits, 2)
    code, out, _ = validate(capsys, str(digits), "--version", "2")
    assert code == 1
    assert "version 1     0.98" in out  # compared against the version serving before it
    assert re.search(r"FAIL: accuracy 0\.1\d+ is under 0\.95; accuracy .* below version 1", out)
    code, out, _ = validate(capsys, str(digits), "--version", "2", "--min-accuracy", "0.05")
    assert code == 1 and "is under" not in out and "below version 1's" in out
    code, out, _ = validate(
        capsys, str(digits), "--version", "2", "--min-accuracy", "0.05", "--max-drop", "1"
    )
    assert code == 0 and out.strip().endswith("PASS")


def test_bounds_come_from_model_toml_and_flags(digits: Path, capsys):
    toml = digits / "model.toml"
    toml.write_text(toml.read_text() + "\n[validation]\nmin_accuracy = 0.99\n")
    code, out, _ = validate(capsys, str(digits))
    assert code == 1 and "(min 0.99)" in out and "under 0.99" in out
    code, out, _ = validate(capsys, str(digits), "--min-accuracy", "0.9")
    assert code == 0
    code, _, err = validate(capsys, str(digits), "--max-drop", "2")
    assert code == 2 and "--max-drop" in err


def test_an_unloadable_version_fails(digits: Path, capsys):
    (digits / "2").mkdir()
    (digits / "2" / "model.pt").write_bytes(b"not a model")
    code, out, _ = validate(capsys, str(digits), "--version", "2")
    assert code == 1 and "FAIL" in out and "TorchScript" in out


def test_usage_problems_exit_2(digits: Path, tmp_path: Path, capsys):
    code, _, err = validate(capsys, str(digits), "--version", "7")
    assert code == 2 and "has no version 7 (it has 1)" in err
    code, _, err = validate(capsys, str(tmp_path / "nothing"))
    assert code == 2 and "no model.toml" in err
    (digits / "validation.npz").unlink()
    code, _, err = validate(capsys, str(digits))
    assert code == 2 and "has no validation.npz" in err


def test_without_validation_data_the_pipeline_still_checks_pin_and_signature(digits: Path, capsys):
    (digits / "validation.npz").unlink()
    code, out, _ = validate(capsys, str(digits), "--allow-missing-data")
    assert code == 0
    assert out.strip() == "digits version 1: PASS (loads; no validation.npz, accuracy unchecked)"
    toml = digits / "model.toml"
    toml.write_text(toml.read_text() + f'\n[sha256]\n"1" = "{"0" * 64}"\n')
    code, out, _ = validate(capsys, str(digits), "--allow-missing-data")
    assert code == 1 and "FAIL" in out and "does not match the pinned" in out


@pytest.mark.slow
def test_quantize_script_halves_the_model_and_keeps_its_accuracy(digits: Path, capsys):
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "scripts" / "quantize_digits.py"),
            "--models",
            str(digits.parent),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Warning" not in result.stderr, result.stderr
    out = result.stdout
    target = digits / "2" / "model.pt"
    assert target.is_file() and target.stat().st_size < (digits / "1" / "model.pt").stat().st_size
    sizes = re.search(r"parameter bytes\s+([\d,]+) -> +([\d,]+)", out)
    before, after = (int(g.replace(",", "")) for g in sizes.groups())
    assert before == 153_128 and after < before / 2
    assert out.count(": PASS") == 2
    # the packed int8 weights count: the Linear layers are most of the model
    code, out, _ = validate(capsys, str(digits), "--version", "2")
    assert code == 0 and f"model size    {after:,} bytes" in out and after > 19_200

"""`torchgate serve` refuses a broken model repository with one clear line."""

from __future__ import annotations

from pathlib import Path

import httpx

from tests.support import copy_digits, run_cli, server_process


def _serve(models: Path):
    return run_cli("serve", "--models", str(models), "--port", "0", "--no-auth")


def test_corrupt_model_file_stops_serve(tmp_path: Path):
    folder = copy_digits(tmp_path)
    (folder / "1" / "model.pt").write_bytes(b"PK\x03\x04 definitely not a TorchScript archive")
    result = _serve(tmp_path)
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "digits/1/model.pt" in lines[0] and "TorchScript" in lines[0]
    assert "Traceback" not in result.stderr


def test_model_toml_missing_a_field_stops_serve(tmp_path: Path):
    folder = copy_digits(tmp_path)
    toml = folder / "model.toml"
    toml.write_text(
        toml.read_text().replace('datatype = "FP32"\nshape = [1, 8, 8]', "shape = [1, 8, 8]")
    )
    result = _serve(tmp_path)
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert (
        "digits/model.toml" in lines[0] and "inputs[0].datatype: required, and missing" in lines[0]
    )


def test_shape_mismatch_stops_serve(tmp_path: Path):
    folder = copy_digits(tmp_path)
    toml = folder / "model.toml"
    toml.write_text(
        toml.read_text()
        .replace("shape = [10]", "shape = [12]")
        .replace('labels = ["0", "1", "2", "3", "4", "5", "6", "7", "8", "9"]\n', "")
    )
    result = _serve(tmp_path)
    assert result.returncode != 0
    assert "declares [1, 12]" in result.stderr.strip().splitlines()[-1]


def test_missing_repository_and_bad_setting(tmp_path: Path):
    result = _serve(tmp_path / "nowhere")
    assert result.returncode != 0 and "not a directory" in result.stderr
    result = run_cli("serve", "--device", "tpu", "--no-auth")
    assert result.returncode != 0 and "device" in result.stderr and "Traceback" not in result.stderr


def test_serve_runs_and_stops_cleanly(tmp_path: Path):
    copy_digits(tmp_path)
    with server_process("--models", str(tmp_path), "--no-auth") as (proc, url):
        assert httpx.get(url + "/health/ready").status_code == 200
    assert proc.returncode == 0

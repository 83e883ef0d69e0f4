"""`torchgate serve` refuses a broken model repository with one clear line."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import pytest

from tests.support import MODELS, copy_digits, free_port, run_cli, server_process


def _serve(models: Path):
    return run_cli("serve", "--models", str(models), "--port", "0", "--no-auth")


@pytest.mark.slow
def test_corrupt_model_file_stops_serve(tmp_path: Path):
    folder = copy_digits(tmp_path)
    (folder / "1" / "model.pt").write_bytes(b"PK\x03\x04 definitely not a TorchScript archive")
    result = _serve(tmp_path)
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "digits/1/model.pt" in lines[0] and "TorchScript" in lines[0]
    assert "Traceback" not in result.stderr


@pytest.mark.slow
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


@pytest.mark.slow
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
    assert (
        "output 'logits' gives rows of [10], model.toml declares [12]"
        in (result.stderr.strip().splitlines()[-1])
    )


@pytest.mark.slow
def test_missing_repository_and_bad_setting(tmp_path: Path):
    result = _serve(tmp_path / "nowhere")
    assert result.returncode != 0 and "not a directory" in result.stderr
    result = run_cli("serve", "--device", "tpu", "--no-auth")
    assert result.returncode != 0 and "device" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.slow
def test_serve_runs_and_stops_cleanly(tmp_path: Path):
    copy_digits(tmp_path)
    with server_process("--models", str(tmp_path), "--no-auth") as (proc, url):
        assert httpx.get(url + "/health/ready").status_code == 200
    assert proc.returncode == 0


def _without_preprocess(toml: Path) -> str:
    text = toml.read_text()
    return text[: text.index("# A picture")]


@pytest.mark.slow
def test_input_shape_the_model_cannot_take_names_the_cause_and_the_shapes(tmp_path: Path):
    folder = copy_digits(tmp_path)
    toml = folder / "model.toml"
    toml.write_text(_without_preprocess(toml).replace("shape = [1, 8, 8]", "shape = [1, 6, 6]"))
    result = _serve(tmp_path)
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    line = lines[0]
    assert "digits/1/model.pt: the model fails on the inputs model.toml declares" in line
    assert "input 'input' FP32 [1, 6, 6] per row, run as [1, 1, 6, 6]" in line
    # the TorchScript interpreter's last line: the cause, not its preamble
    assert line.endswith("mat1 and mat2 shapes cannot be multiplied (1x288 and 512x64)"), line
    assert "TorchScript interpreter" not in line and "RuntimeError" not in line


@pytest.mark.slow
def test_several_problems_in_model_toml_are_each_listed_in_plain_words(tmp_path: Path):
    folder = copy_digits(tmp_path)
    toml = folder / "model.toml"
    text = _without_preprocess(toml)
    text = text.replace(
        'datatype = "FP32"\nshape = [1, 8, 8]', 'datatype = "FP33"\nshape = [1, 8, 8]'
    )
    text = text.replace("max_batch_size = 64", "max_batch_size = -1\nmax_batchsize = 8")
    text = text.replace("timeout_ms = 10000", "timeout_ms = 0")
    text = text.replace("instances = 1", 'instances = "two"')
    toml.write_text(text)
    result = _serve(tmp_path)
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    line = lines[0]
    for problem in (
        "max_batch_size: must be at least 0",
        "max_batchsize: unknown key",
        "inputs[0].datatype: must be one of BOOL, UINT8",
        "BF16, BYTES, not 'FP33'",
        "batching.timeout_ms: must be over 0",
        "batching.instances: must be an integer",
    ):
        assert problem in line, line
    for artefact in ("Value error", "more)", "Input should", "Field required", "type=", "[type"):
        assert artefact not in line, line


@pytest.mark.slow
def test_each_missing_field_of_model_toml_is_named(tmp_path: Path):
    folder = copy_digits(tmp_path)
    toml = folder / "model.toml"
    toml.write_text(
        _without_preprocess(toml)
        .replace('datatype = "FP32"\nshape = [1, 8, 8]', "")
        .replace('name = "logits"\n', "")
    )
    result = _serve(tmp_path)
    line = result.stderr.strip()
    assert result.returncode != 0 and "\n" not in line, line
    for problem in (
        "inputs[0].datatype: required, and missing",
        "inputs[0].shape: required, and missing",
        "outputs[0].name: required, and missing",
    ):
        assert problem in line, line
    assert "more)" not in line and "Field required" not in line


def test_a_port_in_use_is_found_before_any_model_loads(tmp_path: Path):
    copy_digits(tmp_path)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        started = time.monotonic()
        result = run_cli("serve", "--models", str(tmp_path), "--port", str(port), "--no-auth")
        elapsed = time.monotonic() - started
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"torchgate: error: cannot listen on 127.0.0.1:{port}: the port is in use by another "
        "process; stop it or pick another port (--port or TORCHGATE_PORT)"
    ]
    assert result.stdout == ""  # no model was loaded, nothing started or shut down
    assert elapsed < 20


@pytest.mark.slow
def test_api_key_flags_serve_those_keys_and_never_log_them(tmp_path: Path):
    copy_digits(tmp_path)
    first, second = "dev-key-" + "a" * 24, "dev-key-" + "b" * 24
    port = free_port()
    with tempfile.TemporaryFile(mode="w+") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "torchgate", "serve", "--models", str(tmp_path)]
            + ["--port", str(port), "--api-key", first, "--api-key", second],
            env={**os.environ, "TORCHGATE_RATE_LIMIT": "off"},
            stdout=log,
            stderr=subprocess.STDOUT,
            text=True,
        )
        try:
            url = f"http://127.0.0.1:{port}"
            wait_ready(proc, url)
            body = (MODELS / "digits" / "example.json").read_bytes()
            for key in (first, second):
                answer = httpx.post(
                    url + "/predict", content=body, headers={"Authorization": f"Bearer {key}"}
                )
                assert answer.status_code == 200, answer.text
            refused = httpx.post(url + "/predict", content=body, headers={"X-API-Key": "other"})
            assert refused.status_code == 401
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=60)
        log.seek(0)
        text = log.read()
    assert '"key_name": "env-1"' in text.replace('":"', '": "')  # logs name the key...
    assert first not in text and second not in text  # ...never the key itself


def test_api_key_with_a_comma_is_refused():
    result = run_cli("serve", "--api-key", "one,two")
    assert result.returncode == 2
    assert "--api-key: a key must be non-empty, without commas" in result.stderr


def wait_ready(proc: subprocess.Popen, url: str) -> None:
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        assert proc.poll() is None, "the server exited"
        try:
            if httpx.get(url + "/health/ready", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)  # pacing: a poll
    raise AssertionError("the server did not become ready")


def test_every_problem_of_a_keys_file_is_listed_in_plain_words(tmp_path: Path):
    keys = tmp_path / "keys.toml"
    keys.write_text('[[keys]]\nsha256 = "xyz"\nscopes = ["root"]\nrate_limit = "lots"\n')
    result = run_cli("serve", "--api-keys-file", str(keys), "--port", "0")
    assert result.returncode == 2
    line = result.stderr.strip()
    assert "\n" not in line
    for problem in (
        "keys[0].name: required, and missing",
        "keys[0].sha256: must be the key's SHA-256 as 64 lowercase hex digits",
        "keys[0].scopes[0]: must be 'infer' or 'admin'",
        "keys[0].rate_limit: must read like '1000/minute' or '10 per second', not 'lots'",
    ):
        assert problem in line, line
    assert "String should" not in line and "pattern" not in line and "more)" not in line

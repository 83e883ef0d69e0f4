"""TorchServe for `make bench` (owns setting it up and starting it): its own virtual
environment (bench/.venv-torchserve: torch 2.13.0 from this machine, then TorchServe and
its model archiver 0.12.0; Java 17 from Debian), a model archive of the same TorchScript
file with bench/torchserve_handler.py, and a configuration of one worker, batches of up to
32 within 5 ms, token authorization off, every port on 127.0.0.1.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

from load import HarnessError

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
VENV = BENCH / ".venv-torchserve"
HANDLER = BENCH / "torchserve_handler.py"


def ensure_venv() -> Path:
    """The venv's bin folder, made on the first run."""
    binary = VENV / "bin" / "torchserve"
    if binary.exists():
        return binary.parent
    if shutil.which("java") is None:
        raise HarnessError("TorchServe needs Java 17: apt-get install -y openjdk-17-jre-headless")
    print("bench/.venv-torchserve is missing: installing TorchServe 0.12.0 (once)", flush=True)
    pip = VENV / "bin" / "pip"
    steps = [
        [sys.executable, "-m", "venv", str(VENV)],
        [str(pip), "install", "-q", "--upgrade", "pip"],
        [str(pip), "install", "-q", "torch==2.13.0"],
        [
            str(pip),
            "install",
            "-q",
            "-c",
            str(ROOT / "constraints.txt"),
            "torchserve==0.12.0",
            "torch-model-archiver==0.12.0",
            "nvgpu",
            "pyyaml",
        ],
    ]
    for step in steps:
        if subprocess.run(step, check=False).returncode != 0:
            raise HarnessError(f"could not set up TorchServe: {' '.join(step)}")
    return binary.parent


def archive(model: str, model_pt: Path, store: Path) -> None:
    """`store/<model>.mar` of the TorchScript file and the handler."""
    store.mkdir(parents=True, exist_ok=True)
    if (store / f"{model}.mar").exists():
        return
    command = [
        str(VENV / "bin" / "torch-model-archiver"),
        "--model-name",
        model,
        "--version",
        "1.0",
        "--serialized-file",
        str(model_pt),
        "--handler",
        str(HANDLER),
        "--export-path",
        str(store),
        "--force",
    ]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise HarnessError(f"torch-model-archiver failed: {done.stderr[-500:]}")


def command(model: str, model_pt: Path, work: Path, port: int, ports: tuple[int, int]) -> list[str]:
    """The `torchserve --foreground` command line serving `model` on `port`."""
    bin_dir = ensure_venv()
    store = work / "torchserve-store"
    archive(model, model_pt, store)
    config = work / f"torchserve-{port}.properties"
    models = {
        model: {
            "1.0": {
                "defaultVersion": True,
                "marName": f"{model}.mar",
                "minWorkers": 1,
                "maxWorkers": 1,
                "batchSize": 32,
                "maxBatchDelay": 5,
                "responseTimeout": 120,
            }
        }
    }
    config.write_text(
        "\n".join(
            [
                f"inference_address=http://127.0.0.1:{port}",
                f"management_address=http://127.0.0.1:{ports[0]}",
                f"metrics_address=http://127.0.0.1:{ports[1]}",
                f"model_store={store}",
                f"load_models={model}.mar",
                "disable_token_authorization=true",
                "default_workers_per_model=1",
                "install_py_dep_per_model=false",
                "disable_system_metrics=true",
                f"models={json.dumps(models)}",
            ]
        )
        + "\n"
    )
    return [
        str(bin_dir / "torchserve"),
        "--start",
        "--foreground",
        "--ncs",
        "--ts-config",
        str(config),
        "--model-store",
        str(store),
        "--disable-token-auth",
    ]

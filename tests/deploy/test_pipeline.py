"""The delivery pipeline (.github/workflows/pipeline.yml) and the make targets it calls,
run for real: actionlint on the workflow, `make validate` on the bundled models and on
broken copies of digits, `make manifests` on k8s/ and on copies with a broken patch,
`make rules`, the smoke check against a real `torchgate serve`, and the canary gates
against a stand-in Prometheus."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlparse

import pytest
import torch
import yaml
from torch import nn

from scripts import canary_gates
from tests.lifecycle.test_validation import Constant
from tests.support import MODELS, ROOT, copy_digits, free_port, promtool, server_process

WORKFLOW = ROOT / ".github" / "workflows" / "pipeline.yml"
STAGES = {"build", "test", "validate", "deploy", "monitor"}
DIGEST = "ghcr.io/example/torchgate@sha256:" + "ab" * 32


def make(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """`make ARGS` in the repository, as CI and a laptop run it (not as a sub-make of
    whatever make started these tests)."""
    clean = {k: v for k, v in os.environ.items() if k not in {"MAKEFLAGS", "MFLAGS", "MAKELEVEL"}}
    return subprocess.run(
        ["make", "--no-print-directory", *args],
        cwd=ROOT,
        env={**clean, **(env or {})},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def output(result: subprocess.CompletedProcess[str]) -> str:
    return result.stdout + result.stderr


def kubectl() -> None:
    if shutil.which("kubectl") is None:
        pytest.skip("kubectl is not installed: kustomizations cannot be rendered")


# ------------------------------------------------------------------------ the workflow


def workflow() -> dict[str, Any]:
    return yaml.safe_load(WORKFLOW.read_text())


def actionlint() -> str:
    beside = Path(sys.executable).parent / "actionlint"
    path = str(beside) if beside.exists() else shutil.which("actionlint")
    if path is None:
        pytest.fail("actionlint is missing: it comes with `pip install -e .[dev]`")
    return path


def test_workflow_passes_actionlint() -> None:
    result = subprocess.run(
        [actionlint(), "-no-color", str(WORKFLOW.relative_to(ROOT))],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0 and not result.stdout.strip(), output(result)


def make_targets() -> set[str]:
    """The targets in make's own database of the Makefile."""
    database = subprocess.run(
        ["make", "--print-data-base", "--question", "--no-builtin-rules", "-f", "Makefile", ":"],
        cwd=ROOT,
        env={k: v for k, v in os.environ.items() if k != "MAKEFLAGS"},
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    ).stdout
    targets, previous = set(), ""
    for line in database.splitlines():
        found = re.match(r"([A-Za-z0-9][\w.-]*):(?!=)", line)
        if found and not previous.startswith("# Not a target"):
            targets.add(found.group(1))
        previous = line
    return targets


# a word of a make command line: an option, a variable setting or a target
MAKE_WORD = r"""(?:-[\w-]+|[A-Z_][A-Z0-9_]*=\S*|[a-z][\w.-]*)(?=[\s)"';&|]|$)"""


def called_targets() -> set[str]:
    """Every target a `make ...` in a run step names."""
    called = set()
    for job in workflow()["jobs"].values():
        for step in job["steps"]:
            for command in re.findall(rf"\bmake((?:[ \t]+{MAKE_WORD})+)", step.get("run", "")):
                called |= {w for w in command.split() if not w.startswith("-") and "=" not in w}
    return called


def test_every_make_target_the_workflow_calls_exists() -> None:
    targets, called = make_targets(), called_targets()
    assert {"install", "test", "lint", "validate", "manifests"} <= targets  # the parse works
    assert {
        "wheel",
        "hadolint",
        "lint",
        "test",
        "validate",
        "manifests",
        "rules",
        "deploy-canary",
        "smoke-k8s",
        "canary-gates",
        "deploy-production",
    } <= called
    assert called - targets == set(), "the workflow calls make targets the Makefile lacks"


def test_workflow_has_a_job_per_stage_and_gates_production() -> None:
    jobs = workflow()["jobs"]
    assert {job["name"].split()[0] for job in jobs.values()} == STAGES
    redis = jobs["test"]["services"]["redis"]
    assert redis["image"].startswith("redis:") and "6379:6379" in redis["ports"]
    build = jobs["build"]["steps"]
    uses = {step.get("uses", "").split("@")[0]: step for step in build}
    assert "${{ github.sha }}" in uses["docker/build-push-action"]["with"]["tags"]
    assert "anchore/sbom-action" in uses
    assert "steps.image.outputs.digest" in json.dumps(build), "deploys go by digest"
    # every check gates the deploy; production waits for staging and its environment
    staging, production = jobs["staging"], jobs["production"]
    assert set(staging["needs"]) == {"build", "test", "validate", "manifests", "rules"}
    assert staging["environment"] == "staging" and production["environment"] == "production"
    assert "staging" in production["needs"]
    for job in (staging, production):
        assert job["env"]["IMAGE"] == "${{ needs.build.outputs.image }}"
        assert job["concurrency"]["cancel-in-progress"] is False
        runs = " ".join(step.get("run", "") for step in job["steps"])
        assert "make smoke-k8s" in runs, "a smoke check after each deploy"


def test_ci_runs_the_readmes_test_command() -> None:
    text = (ROOT / ".ci" / "run").read_text()
    assert re.search(r"^make test$", text, re.MULTILINE)
    assert "make test" in (ROOT / "README.md").read_text()


# -------------------------------------------------------------------- build and image


def test_hadolint_target_passes_and_the_image_is_tagged_with_the_commit() -> None:
    result = make("hadolint")
    assert result.returncode == 0, output(result)
    commit = subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.strip()
    planned = make("--dry-run", "image")
    assert f"docker build -t torchgate:{commit} ." in planned.stdout, output(planned)


# --------------------------------------------------------------------------- validate


@pytest.mark.slow
def test_make_validate_passes_the_bundled_models() -> None:
    result = make("validate")
    assert result.returncode == 0, output(result)
    assert "digits version 1: PASS" in result.stdout
    assert re.search(r"validate: PASS: \d+ version\(s\) of \d+ model\(s\)", result.stdout)


class Flat(nn.Module):
    """The wrong signature for digits: 64 outputs per row, not 10."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1)


def tamper_pin(digits: Path) -> str:
    toml = digits / "model.toml"
    toml.write_text(toml.read_text() + f'\n[sha256]\n"1" = "{"0" * 64}"\n')
    return "does not match the pinned"


def wrong_signature(digits: Path) -> str:
    torch.jit.script(Flat()).save(str(digits / "1" / "model.pt"))
    return "output 'logits' gives rows of [64], model.toml declares [10] (run with 1 row)"


def bad_accuracy(digits: Path) -> str:
    (digits / "2").mkdir()
    torch.jit.script(Constant()).save(str(digits / "2" / "model.pt"))
    return "is under 0.95"


@pytest.mark.slow
@pytest.mark.parametrize(
    ("breaks", "failing"),
    [(tamper_pin, "digits/1"), (wrong_signature, "digits/1"), (bad_accuracy, "digits/2")],
    ids=["sha256-pin", "signature", "accuracy"],
)
def test_make_validate_fails_a_broken_version(tmp_path: Path, breaks, failing: str) -> None:
    problem = breaks(copy_digits(tmp_path))
    result = make("validate", f"MODELS={tmp_path}")
    assert result.returncode != 0, output(result)
    assert problem in result.stdout, output(result)
    assert f"validate: FAIL: {failing} (1 of" in result.stdout


@pytest.mark.slow
def test_make_validate_checks_pin_and_signature_without_validation_data(tmp_path: Path) -> None:
    digits = copy_digits(tmp_path)
    (digits / "validation.npz").unlink()
    result = make("validate", f"MODELS={tmp_path}")
    assert result.returncode == 0, output(result)
    assert "digits version 1: PASS (loads; no validation.npz, accuracy unchecked)" in result.stdout
    problem = tamper_pin(digits)
    result = make("validate", f"MODELS={tmp_path}")
    assert result.returncode != 0 and problem in result.stdout, output(result)


def test_make_validate_fails_an_empty_repository(tmp_path: Path) -> None:
    result = make("validate", f"MODELS={tmp_path}")
    assert result.returncode != 0 and "holds no model folder" in result.stdout, output(result)


# ------------------------------------------------------------------- deploy: manifests


@pytest.mark.slow
def test_make_manifests_renders_and_validates_every_overlay() -> None:
    kubectl()
    result = make("manifests")
    assert result.returncode == 0, output(result)
    for target in ("base", "overlays/cpu", "overlays/gpu", "overlays/canary", "redis"):
        assert re.search(rf"^{target}: \d+ objects, valid", result.stdout, re.MULTILINE)
    assert "manifests: PASS: 8 kustomizations" in result.stdout


def unknown_field(text: str) -> str:
    return text.replace("          resources:", "          resourcez:")


def wrong_type(text: str) -> str:
    return text + "  replicas: three\n"


def patch_of_nothing(text: str) -> str:
    return text.replace("name: torchgate\n", "name: torchgat\n", 1)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("breaks", "problem"),
    [
        (unknown_field, "is not a valid 1.32 object: .*resourcez"),
        (wrong_type, "is not a valid 1.32 object: spec.replicas"),
        (patch_of_nothing, "kubectl kustomize overlays/cpu failed"),
    ],
    ids=["unknown-field", "wrong-type", "no-target"],
)
def test_make_manifests_fails_a_broken_patch(tmp_path: Path, breaks, problem: str) -> None:
    kubectl()
    k8s = tmp_path / "k8s"
    shutil.copytree(ROOT / "k8s", k8s)
    patch = k8s / "overlays" / "cpu" / "resources.yaml"
    patch.write_text(breaks(patch.read_text()))
    result = make("manifests", f"K8S={k8s}")
    assert result.returncode != 0, output(result)
    # the cpu overlay fails (and what is built on it); the others still pass
    assert re.search(rf"^overlays/cpu: FAIL: .*{problem}", result.stdout, re.MULTILINE), output(
        result
    )
    assert re.search(r"^overlays/gpu: \d+ objects, valid", result.stdout, re.MULTILINE)
    assert "manifests: FAIL:" in result.stdout


def test_render_sets_the_deployments_images() -> None:
    kubectl()
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "scripts" / "manifests.py"),
            "render",
            "overlays/canary",
            "--image",
            f"torchgate-canary={DIGEST}",
            "--image",
            "torchgate=ghcr.io/example/torchgate:running",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, output(result)
    deployments = {
        o["metadata"]["name"]: o
        for o in yaml.safe_load_all(result.stdout)
        if o["kind"] == "Deployment"
    }
    images = {
        name: d["spec"]["template"]["spec"]["containers"][0]["image"]
        for name, d in deployments.items()
    }
    assert images == {"torchgate": "ghcr.io/example/torchgate:running", "torchgate-canary": DIGEST}


@pytest.mark.parametrize("target", ["deploy-canary", "deploy-production"])
def test_deploys_refuse_an_image_that_is_not_a_digest(target: str) -> None:
    result = make(target, "IMAGE=ghcr.io/example/torchgate:latest")
    assert result.returncode != 0
    assert "IMAGE must name an image by digest" in result.stderr
    assert "kubectl" not in result.stdout, "refused before anything touched the cluster"


# ------------------------------------------------------------------- monitor: rules


def test_make_rules_checks_the_alert_rules(tmp_path: Path) -> None:
    promtool()
    result = make("rules")
    assert result.returncode == 0 and "SUCCESS" in output(result), output(result)
    broken = tmp_path / "monitoring"
    broken.mkdir()
    rules = (ROOT / "k8s" / "monitoring" / "rules.yml").read_text()
    (broken / "rules.yml").write_text(
        rules.replace("histogram_quantile(0.99,", "histogram_quantile(0.99", 1)
    )
    result = make("rules", f"K8S={tmp_path}")
    assert result.returncode != 0, output(result)


# --------------------------------------------------------------- monitor: smoke check


KEY = "smoke-test-key-0123456789"


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    with server_process(
        "--models", str(MODELS), "--default-model", "digits", env={"TORCHGATE_API_KEYS": KEY}
    ) as (_, url):
        yield url


@pytest.mark.slow
def test_make_smoke_passes_against_a_real_server(server: str) -> None:
    result = make("smoke", f"SMOKE_URL={server}", env={"TORCHGATE_API_KEY": KEY})
    assert result.returncode == 0, output(result)
    assert re.search(
        r"smoke: PASS: POST /predict answered 200 in \d+ ms: digits version 1", result.stdout
    )


@pytest.mark.slow
def test_smoke_fails_when_the_prediction_is_refused(server: str) -> None:
    result = make("smoke", f"SMOKE_URL={server}", env={"TORCHGATE_API_KEY": "not-a-key"})
    assert result.returncode != 0
    assert "smoke: FAIL: POST /predict answered 401" in result.stdout, output(result)


@pytest.mark.slow
def test_smoke_fails_when_the_server_is_never_ready() -> None:
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "scripts" / "smoke.py"),
            f"http://127.0.0.1:{free_port()}",
            "--timeout",
            "1",
        ],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 1
    assert "/health/ready not 200 within 1 s (last: None)" in result.stdout, output(result)


# ------------------------------------------------------------- deploy: canary gates


class Prometheus(BaseHTTPRequestHandler):
    """A stand-in for Prometheus' instant query API, answering from `values`."""

    values: dict[str, float | None] = {}

    def do_GET(self) -> None:
        query = parse_qs(urlparse(self.path).query)["query"][0]
        if "histogram_quantile" in query:
            value = self.values["p99"]
        elif 'status=~"5.."' in query:
            value = self.values["errors"]
        else:
            value = self.values["requests"]
        result = [] if value is None else [{"metric": {}, "value": [0, str(value)]}]
        body = json.dumps({"status": "success", "data": {"resultType": "vector", "result": result}})
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.end_headers()
        self.wfile.write(body.encode())

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def prometheus() -> Iterator[type[Prometheus]]:
    handler = type("Answers", (Prometheus,), {"values": {}})
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    handler.url = f"http://127.0.0.1:{httpd.server_address[1]}"  # type: ignore[attr-defined]
    try:
        yield handler
    finally:
        httpd.shutdown()
        httpd.server_close()


@pytest.mark.parametrize(
    ("values", "passed", "line"),
    [
        (
            {"requests": 5000, "errors": 0.002, "p99": 0.12},
            True,
            "PASS: p99 latency (s) 0.12 (must be < 0.5)",
        ),
        (
            {"requests": 5000, "errors": 0.02, "p99": 0.12},
            False,
            "FAIL: error rate 0.02 (must be < 0.01)",
        ),
        (
            {"requests": 5000, "errors": 0.0, "p99": 0.7},
            False,
            "FAIL: p99 latency (s) 0.7 (must be < 0.5)",
        ),
        ({"requests": 40, "errors": 0.0, "p99": 0.1}, False, "FAIL: requests 40 (must be >= 1000)"),
        ({"requests": None, "errors": None, "p99": None}, False, "FAIL: error rate no data"),
    ],
    ids=["gates-hold", "errors", "latency", "too-little-traffic", "no-data"],
)
@pytest.mark.slow
def test_make_canary_gates(prometheus, values, passed: bool, line: str) -> None:
    prometheus.values.update(values)
    result = make("canary-gates", f"PROMETHEUS_URL={prometheus.url}")
    assert (result.returncode == 0) is passed, output(result)
    assert f"canary: {line}" in result.stdout


@pytest.mark.slow
def test_canary_gate_queries_parse(tmp_path: Path) -> None:
    """promtool has no query checker, so each gate's query becomes a recording rule."""
    rules = [
        {"record": f"canary:gate_{i}", "expr": g.promql("30m")}
        for i, g in enumerate(canary_gates.GATES)
    ]
    path = tmp_path / "gates.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "canary", "rules": rules}]}))
    result = subprocess.run(
        [promtool(), "check", "rules", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, output(result)

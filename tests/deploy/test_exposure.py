"""What the Ingress makes public: the inference APIs, never /metrics or /dashboard."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

K8S = Path(__file__).resolve().parents[2] / "k8s"
PRIVATE = ["/metrics", "/dashboard", "/dashboard/data", "/health", "/health/ready"]
PUBLIC = [
    "/predict",
    "/v1/models/digits:predict",
    "/v1/models/digits/versions/1:predict",
    "/v2/models/digits/infer",
    "/v2/health/ready",
    "/v1/embeddings",
]


def ingress_paths() -> list[tuple[str, str]]:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed (apt-get install -y kubectl)")
    rendered = subprocess.run(
        [kubectl, "kustomize", str(K8S / "ingress")], capture_output=True, text=True, check=True
    ).stdout
    paths = []
    for obj in yaml.safe_load_all(rendered):
        if obj and obj["kind"] == "Ingress":
            for rule in obj["spec"]["rules"]:
                paths += [(p["path"], p["pathType"]) for p in rule["http"]["paths"]]
    return paths


def routed(path: str, rules: list[tuple[str, str]]) -> bool:
    """Whether an Ingress with these rules sends `path` to torchgate (Kubernetes' rules:
    Exact matches the whole path, Prefix matches whole path elements)."""
    for rule, kind in rules:
        if kind == "Exact" and path == rule:
            return True
        prefix = kind in ("Prefix", "ImplementationSpecific")
        if prefix and (rule == "/" or path == rule or path.startswith(rule.rstrip("/") + "/")):
            return True
    return False


def test_metrics_and_dashboard_stay_off_the_public_path() -> None:
    rules = ingress_paths()
    assert rules, "the Ingress routes nothing"
    for path in PRIVATE:
        assert not routed(path, rules), f"{path} is public through the Ingress"
    for path in PUBLIC:
        assert routed(path, rules), f"{path} is not reachable through the Ingress"

"""Render torchgate's kustomizations with `kubectl kustomize` and validate what they render.

    python scripts/manifests.py check [K8S]     every kustomization under K8S (default k8s)
    python scripts/manifests.py render TARGET [--root K8S] [--image DEPLOYMENT=REF ...]

`check` is the pipeline's `make manifests`: each kustomization must render, and every
object it renders must be valid against the Kubernetes API schemas of K8S_VERSION
(kubernetes-validate, strict: unknown fields are errors), appear once, and sit in the
torchgate namespace. The Prometheus Operator's objects, which those schemas lack, get
structural checks of their own. A component cannot be rendered alone: it is rendered on
top of the cpu overlay. `render` prints one target's objects, validated, with the named
Deployments' server containers set to the given images: what `make deploy-*` applies.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import kubernetes_validate
import yaml

K8S = Path(__file__).resolve().parents[1] / "k8s"
K8S_VERSION = "1.32"
NAMESPACE = "torchgate"
COMPONENT_BASE = "overlays/cpu"
CONTAINER = "torchgate"

# Custom resources of the Prometheus Operator: not in the Kubernetes schemas.
CRD_KINDS = {"ServiceMonitor", "PrometheusRule"}
SERVICE_MONITOR_FIELDS = {
    "selector",
    "namespaceSelector",
    "endpoints",
    "podTargetLabels",
    "targetLabels",
    "jobLabel",
}
ENDPOINT_FIELDS = {"port", "path", "interval", "scrapeTimeout", "scheme"}
GROUP_FIELDS = {"name", "interval", "rules"}
RULE_FIELDS = {"alert", "record", "expr", "for", "labels", "annotations"}
SEVERITIES = {"critical", "warning", "info"}
DURATION = re.compile(r"\d+[smhdwy]")
DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")

Object = dict[str, Any]


class ManifestError(Exception):
    """A kustomization that does not render, or an image that cannot be set."""


def kustomizations(root: Path = K8S) -> list[str]:
    """Every folder under `root` holding a kustomization.yaml, relative to `root`."""
    return sorted(str(p.parent.relative_to(root)) for p in root.rglob("kustomization.yaml"))


def render(target: str, root: Path = K8S, kubectl: str = "kubectl") -> list[Object]:
    """The objects `kubectl kustomize` renders for `root/target`."""
    directory = root / target
    kind = yaml.safe_load((directory / "kustomization.yaml").read_text()).get("kind")
    with tempfile.TemporaryDirectory(prefix="torchgate-kustomize-") as wrapper:
        if kind == "Component":
            # Paths in a kustomization must be relative.
            overlay = {
                "apiVersion": "kustomize.config.k8s.io/v1beta1",
                "kind": "Kustomization",
                "namespace": NAMESPACE,
                "resources": [os.path.relpath(root / COMPONENT_BASE, wrapper)],
                "components": [os.path.relpath(directory, wrapper)],
            }
            (Path(wrapper) / "kustomization.yaml").write_text(yaml.safe_dump(overlay))
            directory = Path(wrapper)
        result = subprocess.run(
            [kubectl, "kustomize", str(directory)],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    if result.returncode != 0:
        raise ManifestError(f"kubectl kustomize {target} failed:\n{result.stderr.strip()}")
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def where(obj: Object) -> str:
    return f"{obj.get('kind')}/{obj.get('metadata', {}).get('name')}"


def problems(obj: Object) -> list[str]:
    """What is wrong with one object: schema errors, or a custom resource's shape."""
    if obj.get("kind") in CRD_KINDS:
        return [f"{where(obj)}: {p}" for p in crd_problems(obj)]
    try:
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
    except kubernetes_validate.ValidationError as exc:
        path = ".".join(str(p) for p in exc.path)
        return [f"{where(obj)} is not a valid {K8S_VERSION} object: {path}: {exc.message}"]
    except kubernetes_validate.SchemaNotFoundError as exc:
        return [f"{where(obj)}: {exc.message}"]
    return []


def rendered_problems(objects: list[Object]) -> list[str]:
    """`problems` of each object, plus duplicates and objects outside the namespace."""
    found: list[str] = []
    seen: set[str] = set()
    for obj in objects:
        found += problems(obj)
        if where(obj) in seen:
            found.append(f"{where(obj)} is rendered twice")
        seen.add(where(obj))
        namespace = obj.get("metadata", {}).get("namespace")
        if obj.get("kind") != "Namespace" and namespace != NAMESPACE:
            found.append(f"{where(obj)} is in namespace {namespace!r}, not {NAMESPACE!r}")
    return found


def crd_problems(obj: Object) -> list[str]:
    """Structural checks of a ServiceMonitor or PrometheusRule."""
    found = []
    if obj.get("apiVersion") != "monitoring.coreos.com/v1":
        found.append(f"apiVersion {obj.get('apiVersion')!r} is not monitoring.coreos.com/v1")
    if extra := set(obj) - {"apiVersion", "kind", "metadata", "spec"}:
        found.append(f"unknown fields {sorted(extra)}")
    if not DNS_LABEL.fullmatch(str(obj.get("metadata", {}).get("name", ""))):
        found.append("metadata.name is not a DNS label")
    spec = obj.get("spec") or {}
    if obj["kind"] == "PrometheusRule":
        if set(spec) != {"groups"}:
            return [*found, "spec must hold exactly `groups`"]
        return found + rule_group_problems(spec)
    if extra := set(spec) - SERVICE_MONITOR_FIELDS:
        found.append(f"unknown spec fields {sorted(extra)}")
    if not spec.get("selector", {}).get("matchLabels"):
        found.append("spec.selector.matchLabels is empty")
    if not spec.get("endpoints"):
        found.append("spec.endpoints is empty")
    for endpoint in spec.get("endpoints", []):
        if extra := set(endpoint) - ENDPOINT_FIELDS:
            found.append(f"unknown endpoint fields {sorted(extra)}")
        if not isinstance(endpoint.get("port"), str):
            found.append("an endpoint's port must be a port name")
        if not str(endpoint.get("path", "")).startswith("/"):
            found.append("an endpoint's path must start with /")
    return found


def rule_group_problems(data: Object) -> list[str]:
    """Structural checks of Prometheus rule groups (`promtool check rules` does the rest)."""
    found = []
    names = [g.get("name") for g in data.get("groups", [])]
    if len(names) != len(set(names)):
        found.append("rule group names must be unique")
    for group in data.get("groups", []):
        if extra := set(group) - GROUP_FIELDS:
            found.append(f"group {group.get('name')}: unknown fields {sorted(extra)}")
        if not group.get("rules"):
            found.append(f"group {group.get('name')} has no rules")
        for rule in group.get("rules") or []:
            name = rule.get("alert") or rule.get("record")
            if ("alert" in rule) == ("record" in rule):
                found.append(f"rule {name}: needs exactly one of alert and record")
            if extra := set(rule) - RULE_FIELDS:
                found.append(f"rule {name}: unknown fields {sorted(extra)}")
            if not isinstance(rule.get("expr"), str) or not rule["expr"].strip():
                found.append(f"rule {name}: empty expr")
            if "for" in rule and not DURATION.fullmatch(str(rule["for"])):
                found.append(f"rule {name}: `for: {rule['for']}` is not a duration")
            if "alert" in rule:
                if rule.get("labels", {}).get("severity") not in SEVERITIES:
                    found.append(f"rule {name}: severity must be one of {sorted(SEVERITIES)}")
                if not rule.get("annotations", {}).get("summary"):
                    found.append(f"rule {name}: no summary annotation")
            for value in {**rule.get("labels", {}), **rule.get("annotations", {})}.values():
                if not isinstance(value, str):
                    found.append(f"rule {name}: label and annotation values must be strings")
    return found


def set_images(objects: list[Object], images: dict[str, str]) -> None:
    """Point each named Deployment's server container at an image (name -> reference)."""
    deployments = {o["metadata"]["name"]: o for o in objects if o["kind"] == "Deployment"}
    for name, image in images.items():
        if name not in deployments:
            rendered = ", ".join(sorted(deployments))
            raise ManifestError(f"no Deployment {name} is rendered (only {rendered})")
        containers = deployments[name]["spec"]["template"]["spec"]["containers"]
        server = [c for c in containers if c["name"] == CONTAINER]
        if not server:
            raise ManifestError(f"Deployment {name} has no container {CONTAINER!r}")
        server[0]["image"] = image


def check(root: Path, kubectl: str) -> int:
    targets = kustomizations(root)
    if not targets:
        print(f"manifests: no kustomization.yaml under {root}")
        return 1
    failed = 0
    for target in targets:
        try:
            objects = render(target, root, kubectl)
        except ManifestError as exc:
            print(f"{target}: FAIL: {exc}")
            failed += 1
            continue
        found = rendered_problems(objects) or ([] if objects else ["renders no object"])
        for problem in found:
            print(f"{target}: FAIL: {problem}")
        if found:
            failed += 1
        else:
            print(f"{target}: {len(objects)} objects, valid against Kubernetes {K8S_VERSION}")
    if failed:
        print(f"manifests: FAIL: {failed} of {len(targets)} kustomizations")
        return 1
    print(f"manifests: PASS: {len(targets)} kustomizations under {root}")
    return 0


def image_pair(text: str) -> tuple[str, str]:
    name, sep, image = text.partition("=")
    if not sep or not name or not image:
        raise argparse.ArgumentTypeError(f"expected DEPLOYMENT=IMAGE, not {text!r}")
    return name, image


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kubectl", default=shutil.which("kubectl") or "kubectl")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("check", help="render and validate every kustomization")
    p.add_argument("root", type=Path, nargs="?", default=K8S)
    p = sub.add_parser("render", help="print one kustomization's objects, validated")
    p.add_argument("target", help="a folder under the root, e.g. overlays/canary")
    p.add_argument("--root", type=Path, default=K8S)
    p.add_argument("--image", type=image_pair, action="append", default=[], metavar="DEPLOY=REF")
    args = parser.parse_args(argv)
    if args.command == "check":
        return check(args.root, args.kubectl)
    try:
        objects = render(args.target, args.root, args.kubectl)
        set_images(objects, dict(args.image))
    except ManifestError as exc:
        print(f"manifests: {exc}", file=sys.stderr)
        return 1
    if found := rendered_problems(objects):
        print("\n".join(f"manifests: {p}" for p in found), file=sys.stderr)
        return 1
    yaml.safe_dump_all(objects, sys.stdout, sort_keys=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())

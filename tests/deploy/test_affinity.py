"""k8s/affinity: the example Ingress with each model's requests hashed onto a subset of
pods, and the controller's map that names the model from the path, checked against the
routes torchgate serves."""

from __future__ import annotations

import re

import yaml

from tests.deploy.test_manifests import K8S, load_yaml, one
from torchgate.serving.model_config import MODEL_NAME

PREFIX = "nginx.ingress.kubernetes.io/"


def model_map() -> tuple[str, str]:
    """The map's regex (in Python's syntax) and its default value."""
    (config,) = load_yaml(K8S / "affinity" / "controller-configmap.yaml")
    snippet = config["data"]["http-snippet"]
    assert "map $uri $torchgate_model {" in snippet
    regex = re.search(r'"~(.+)"\s+\$model;', snippet)
    default = re.search(r"default\s+(\S+);", snippet)
    assert regex and default
    return regex.group(1).replace("(?<", "(?P<"), default.group(1)


def model_of(path: str) -> str | None:
    regex, _ = model_map()
    match = re.match(regex, path)
    return match.group("model") if match else None


def test_the_affinity_ingress_hashes_on_the_model_onto_a_subset_of_pods():
    ingress = one("affinity", "Ingress")
    annotations = ingress["metadata"]["annotations"]
    assert annotations[PREFIX + "upstream-hash-by"] == "$torchgate_model"
    assert annotations[PREFIX + "upstream-hash-by-subset"] == "true"
    assert int(annotations[PREFIX + "upstream-hash-by-subset-size"]) >= 2
    plain = one("ingress", "Ingress")
    assert ingress["spec"] == plain["spec"]  # the same paths, hosts and backend
    for key, value in plain["metadata"]["annotations"].items():
        assert annotations[key] == value  # and every bound on slow and large clients


def test_the_map_names_the_model_of_every_route_that_has_one():
    for path in (
        "/v1/models/digits:predict",
        "/v1/models/digits/versions/2:predict",
        "/v1/models/digits",
        "/v2/models/digits/infer",
        "/v2/models/digits/versions/2/infer",
        "/v2/models/digits/ready",
    ):
        assert model_of(path) == "digits", path
    assert model_of("/v1/models/m-01.en_gb:predict") == "m-01.en_gb"
    assert model_of("/predict") is None and model_of("/v1/embeddings") is None
    assert model_map()[1] == "$http_x_torchgate_model"
    regex, _ = model_map()
    assert regex.endswith(MODEL_NAME.pattern.strip("^$") + ")")  # torchgate's own rule


def test_the_controller_snippet_is_an_example_not_applied():
    kustomization = yaml.safe_load((K8S / "affinity" / "kustomization.yaml").read_text())
    assert kustomization["resources"] == ["../ingress"]
    assert "controller-configmap.yaml" not in str(kustomization)

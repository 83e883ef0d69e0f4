"""Which served version a request goes to: the version it names, the model's default
one, or, for a request that names none while a canary rolls out, the side of the split
its caller is on (`lifecycle.canary`); and which model `POST /predict` means."""

from __future__ import annotations

from torchgate.errors import ModelNotFound
from torchgate.lifecycle.arm import Arm
from torchgate.serving.served import ServedModel, ServedVersion


def resolve(served: ServedModel, version: str | int | None) -> ServedVersion:
    """The version a request asked for, or the model's default one."""
    if version is None or version == "":
        return served.versions[served.default_version]
    number = version if isinstance(version, int) else _version_number(str(version))
    found = served.versions.get(number) if number is not None else None
    if found is None:
        shown = str(version) if str(version).isdigit() and len(str(version)) < 12 else "?"
        raise ModelNotFound(f"model {served.name} has no version {shown}")
    return found


def route(served: ServedModel, identity: str) -> tuple[ServedVersion, Arm | None]:
    """The version a request without one goes to: the default one, or, by the caller's
    `identity`, the model's canary; while a rollout runs, the side it went to comes back,
    to record the outcome on."""
    canary = served.canary
    if canary is None or not canary.routing:
        return served.versions[served.default_version], None
    number = canary.choose(identity)
    chosen = served.versions.get(number)
    if chosen is None:
        return served.versions[served.default_version], None
    return chosen, canary.arm(number)


def default_model(configured: str | None, known: set[str]) -> str:
    """The configured default model, else the only model this server knows."""
    if configured:
        return configured
    if len(known) == 1:
        return next(iter(known))
    raise ModelNotFound(
        "several models are served and TORCHGATE_DEFAULT_MODEL is not set: "
        "use /v1/models/{name}:predict"
    )


def _version_number(text: str) -> int | None:
    return int(text) if text.isdigit() and len(text) < 12 else None

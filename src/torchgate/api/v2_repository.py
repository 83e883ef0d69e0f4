"""The V2 model repository extension (as Triton has it): list the repository's models, and
load or unload one by name.

The index lists every version folder: READY when served, LOADING while its model loads
on demand, UNAVAILABLE with the reason when not (refused by the gate; or the model is not
loaded, and why: it loads on its first request, it was evicted to make room, its last load
failed). A load answers with the versions served, the default one, and the versions
refused with why (`serving.admission`); it is held to the memory budget as every load is
(`serving.residency`).

Loading and unloading are refused (403) unless `model_control` is "explicit", as Triton
refuses them outside its explicit mode; the admin scope on `/v2/repository` is the auth
middleware's to check. A model name is only ever looked up inside the repository folder.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from starlette.requests import Request

from torchgate.api.body import V2_TYPES, read_body
from torchgate.api.codec import parse_json
from torchgate.api.routes import Policy, admin_only, route
from torchgate.edge.context import context
from torchgate.edge.responses import Answer, json_answer
from torchgate.errors import BadRequest, Forbidden, ModelLoadError, ModelNotReady
from torchgate.serving.model_config import requestable_name
from torchgate.serving.registry import ModelRegistry
from torchgate.serving.repository import ModelRepository
from torchgate.serving.residents import LoadFailed, NoRoom, State

log = logging.getLogger("torchgate.repository")


def _folders(repository: ModelRepository) -> dict[str, list[str] | str]:
    """Runs in a thread: each model folder's versions, or why they cannot be read."""
    try:
        names = repository.names()
    except ModelLoadError:
        return {}
    found: dict[str, list[str] | str] = {}
    for name in names:
        try:
            found[name] = [str(v) for v in repository.versions(name)]
        except ModelLoadError as exc:
            found[name] = exc.problem
    return found


async def on_disk(registry: ModelRegistry, name: str) -> bool:
    """Whether the repository folder holds a model of this name (loaded or not)."""
    if not requestable_name(name):
        return False
    try:
        return name in await asyncio.to_thread(registry.repository.names)
    except ModelLoadError:
        return False


async def _payload(request: Request) -> dict[str, Any]:
    """The optional JSON object these requests carry (clients send an empty body, too)."""
    body = await read_body(request, V2_TYPES)
    payload = parse_json(body) if body.strip() else {}
    if not isinstance(payload, dict):
        raise BadRequest("expected a JSON object")
    return payload


def _entry(name: str, version: str, ready: bool, reason: str, state: str = "") -> dict[str, str]:
    state = state or ("READY" if ready else "UNAVAILABLE")
    return {"name": name, "version": version, "state": state, "reason": reason}


def unloaded_reason(registry: ModelRegistry, name: str) -> tuple[str, str]:
    """A model that is not served: LOADING or UNAVAILABLE, and why."""
    status = registry.residency.status(name)
    if status is None:
        return "UNAVAILABLE", "unloaded"
    if status.state is State.LOADING:
        return "LOADING", f"loading on demand (load = {status.policy})"
    return "UNAVAILABLE", f"unloaded: {status.reason}"


@admin_only
async def index(request: Request) -> Answer:
    """`POST /v2/repository/index`: models in the repository and their state."""
    registry: ModelRegistry = request.app.state.registry
    ready_only = (await _payload(request)).get("ready", False)
    if not isinstance(ready_only, bool):
        raise BadRequest('"ready" must be true or false')
    loaded = {name: registry.get(name) for name in registry.names()}
    folders = await asyncio.to_thread(_folders, registry.repository)
    entries: list[dict[str, str]] = []
    for name in sorted(set(loaded) | set(folders)):
        served = loaded.get(name)
        if served is not None:
            for number in sorted(set(served.versions) | set(served.refused)):
                version = served.versions.get(number)
                if version is None:
                    entries.append(_entry(name, str(number), False, served.refused[number]))
                    continue
                accepting = version.batcher.accepting
                reason = "" if accepting else "not accepting requests"
                entries.append(_entry(name, str(number), accepting, reason))
        elif isinstance(found := folders[name], str):
            entries.append(_entry(name, "", False, found))
        else:
            state, reason = unloaded_reason(registry, name)
            entries += [_entry(name, version, False, reason, state) for version in found]
    if ready_only:
        entries = [e for e in entries if e["state"] == "READY"]
    return json_answer(entries)


def _allow_model_control(request: Request) -> None:
    if request.app.state.settings.model_control != "explicit":
        raise Forbidden(
            "model control is disabled: explicit model load / unload needs the server "
            "started with TORCHGATE_MODEL_CONTROL=explicit"
        )


@admin_only
async def load(request: Request) -> Answer:
    """`POST /v2/repository/models/{name}/load`: load or reload a model."""
    name = context(request).params["name"]
    registry: ModelRegistry = request.app.state.registry
    _allow_model_control(request)
    parameters = (await _payload(request)).get("parameters") or {}
    if not isinstance(parameters, dict):
        raise BadRequest('"parameters" must be an object')
    if any(k == "config" or str(k).startswith("file:") for k in parameters):
        raise BadRequest("loading with a config or files sent in the request is not supported")
    if not requestable_name(name):
        raise BadRequest("model names are [a-z0-9][a-z0-9_.-]*, at most 64 characters")
    try:
        served = await registry.load(name)
    except LoadFailed as exc:
        raise BadRequest(f"model {name} could not be loaded: {exc}") from None
    except NoRoom as exc:
        raise ModelNotReady(str(exc), retry_after_s=1) from None
    versions = [str(v) for v in sorted(served.versions)]
    refused = [{"version": str(v), "reason": r} for v, r in sorted(served.refused.items())]
    log.info(
        "model loaded on request",
        extra={"model": name, "versions": versions, "refused": [r["version"] for r in refused]},
    )
    return json_answer(
        {
            "name": name,
            "versions": versions,
            "default_version": str(served.default_version),
            "state": "READY",
            "refused": refused,
            "notes": served.notes,
        }
    )


@admin_only
async def unload(request: Request) -> Answer:
    """`POST /v2/repository/models/{name}/unload`: unload a model."""
    name = context(request).params["name"]
    registry: ModelRegistry = request.app.state.registry
    _allow_model_control(request)
    await registry.unload(name)
    log.info("model unloaded on request", extra={"model": name})
    return json_answer({"name": name, "state": "UNAVAILABLE"})


ROUTES = [
    route("/v2/repository/index", "POST", Policy.ADMIN, index),
    route("/v2/repository/models/{name}/load", "POST", Policy.ADMIN, load),
    route("/v2/repository/models/{name}/unload", "POST", Policy.ADMIN, unload),
]

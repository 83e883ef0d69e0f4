"""The model lifecycle admin API: a model's canary rollout and its input drift.

- `GET /admin/models/{name}/canary`: the rollout's state (version, weight, window stats,
  stable version, last decision).
- `POST /admin/models/{name}/canary` `{"weight": 0.5, "version": 2}`: set the weight by
  hand (0 pauses, 1 promotes; `version` starts or retargets the rollout).
- `GET /admin/models/{name}/drift`: the drift score now (recomputed), the features that
  moved most, and the share of each predicted class in the window.

Everything under `/admin` needs a key with the admin scope (the auth middleware checks).
"""

from __future__ import annotations

import math
from typing import Any

import pydantic
from starlette.requests import Request

from torchgate import problems
from torchgate.api.body import read_body
from torchgate.api.codec import parse_json
from torchgate.api.routes import Policy, admin_only, route
from torchgate.edge.context import context
from torchgate.edge.responses import Answer, json_answer
from torchgate.errors import BadRequest, ModelNotFound
from torchgate.serving.registry import ModelRegistry

TOP_FEATURES = 5


class CanaryUpdate(pydantic.BaseModel):
    """The body of `POST /admin/models/{name}/canary`."""

    model_config = pydantic.ConfigDict(extra="forbid")

    weight: float = pydantic.Field(ge=0, le=1)
    version: int | None = pydantic.Field(None, ge=0)


def _target(request: Request) -> tuple[str, ModelRegistry]:
    return context(request).params["name"], request.app.state.registry


@admin_only
async def canary_state(request: Request) -> Answer:
    """`GET /admin/models/{name}/canary`: the rollout's state."""
    name, registry = _target(request)
    served = registry.get(name)
    if served.canary is None:
        return json_answer(
            {"model": name, "status": "none", "stable_version": served.default_version}
        )
    return json_answer(served.canary.state())


@admin_only
async def set_canary(request: Request) -> Answer:
    """`POST /admin/models/{name}/canary`: set the weight (and version) by hand."""
    name, registry = _target(request)
    registry.get(name)
    try:
        update = CanaryUpdate.model_validate(parse_json(await read_body(request)))
    except pydantic.ValidationError as exc:
        raise BadRequest(
            f'{problems.describe(exc)} (send {{"weight": 0.5, "version": 2}})'
        ) from None
    try:
        canary = registry.set_canary(name, update.weight, update.version)
    except ValueError as exc:
        raise BadRequest(str(exc)) from None
    return json_answer(canary.state())


@admin_only
async def drift(request: Request) -> Answer:
    """`GET /admin/models/{name}/drift`: the drift score now."""
    name, registry = _target(request)
    monitor = registry.get(name).drift
    if monitor is None:
        raise ModelNotFound(f"model {name} has no drift monitor (no reference.npz beside it)")
    report = await monitor.refresh()
    body: dict[str, Any] = {"model": name, "score": None, "rows": 0}
    if report is not None:
        body["rows"] = report.rows
        body["score"] = None if math.isnan(report.score) else round(report.score, 6)
        order = report.psi.argsort()[::-1][:TOP_FEATURES]
        body["top_features"] = [
            {"feature": int(i), "psi": round(float(report.psi[i]), 6)} for i in order
        ]
        body["predicted"] = {str(k): round(v, 6) for k, v in report.predicted.items()}
    return json_answer(body)


ROUTES = [
    route("/admin/models/{name}/canary", "GET", Policy.ADMIN, canary_state),
    route("/admin/models/{name}/canary", "POST", Policy.ADMIN, set_canary),
    route("/admin/models/{name}/drift", "GET", Policy.ADMIN, drift),
]

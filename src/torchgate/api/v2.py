"""The V2 protocol's routes (Open Inference Protocol, as Triton and KServe speak it): server
and model metadata, health and readiness, and `infer`, over the shared request path.

The codec is `api.v2_codec` (binary tensors: `api.binary`); the model repository
extension lives in `api.v2_repository`.
"""

from __future__ import annotations

from typing import Any

from starlette.requests import Request

from torchgate import __version__
from torchgate.api import binary, inference, prepare, v2_repository, v2_stats
from torchgate.api.body import V2_TYPES, read_body
from torchgate.api.codec import parse_json
from torchgate.api.health import readiness_problems
from torchgate.api.routes import Policy, route
from torchgate.api.v2_codec import InferRequest, decode, encode
from torchgate.api.v2_stats import PLATFORM
from torchgate.edge.context import context
from torchgate.edge.responses import BINARY, Answer, json_answer
from torchgate.errors import ModelNotFound, ModelNotReady, Unavailable
from torchgate.serving.breaker import BreakerState
from torchgate.serving.model_config import TensorSpec
from torchgate.serving.registry import ModelRegistry
from torchgate.serving.served import ServedModel, ServedVersion

EXTENSIONS = ["binary_tensor_data", "model_repository", "model_configuration", "statistics"]


async def server_metadata(request: Request) -> Answer:
    return json_answer({"name": "torchgate", "version": __version__, "extensions": EXTENSIONS})


async def live(request: Request) -> Answer:
    return json_answer({"live": True})


async def ready(request: Request) -> Answer:
    """Readiness, by the same rule as /health/ready."""
    problems = readiness_problems(request)
    if problems:
        raise Unavailable(f"not ready: {'; '.join(problems)}")
    return json_answer({"ready": True})


def model_metadata(served: ServedModel) -> dict[str, Any]:
    """A model's V2 metadata: its versions and signature, batch dim as -1 when it batches."""
    config = served.config
    batch = [-1] if config.batched else []

    def tensor(spec: TensorSpec) -> dict[str, Any]:
        return {"name": spec.name, "datatype": spec.datatype, "shape": [*batch, *spec.shape]}

    body: dict[str, Any] = {
        "name": served.name,
        "versions": [str(v) for v in sorted(served.versions)],
        "platform": PLATFORM,
        "inputs": [tensor(s) for s in config.inputs],
        "outputs": [tensor(s) for s in config.outputs],
    }
    if config.processor_inputs is not None and config.preprocess is not None:
        # torchgate's own field: what a request may carry instead of the inputs above
        body["preprocess"] = {
            "kind": config.preprocess.kind,
            "inputs": [tensor(s) for s in config.processor_inputs],
        }
    return body


async def metadata(request: Request) -> Answer:
    """`GET /v2/models/{name}[/versions/{version}]`; a model loaded on demand is loaded
    first, as for a request (clients ask for metadata before they infer)."""
    params = context(request).params
    registry = inference.registry_of(request)
    await registry.residency.acquire(params["name"])
    if "version" in params:
        registry.resolve(params["name"], params["version"])
    return json_answer(model_metadata(registry.get(params["name"])))


async def config(request: Request) -> Answer:
    """`GET /v2/models/{name}[/versions/{version}]/config`, in Triton's shape (a model
    loaded on demand is loaded first)."""
    params = context(request).params
    registry = inference.registry_of(request)
    await registry.residency.acquire(params["name"])
    served = registry.resolve(params["name"], params.get("version"))
    return json_answer(v2_stats.model_config(registry.get(params["name"]), served))


async def statistics(request: Request) -> Answer:
    """`GET /v2/models[/{name}[/versions/{version}]]/stats`, in Triton's shape."""
    params = context(request).params
    registry = inference.registry_of(request)
    metrics = request.app.state.metrics
    return json_answer(
        v2_stats.statistics(registry, metrics, params.get("name"), params.get("version"))
    )


async def model_ready(request: Request) -> Answer:
    """`GET /v2/models/{name}[/versions/{version}]/ready`."""
    params = context(request).params
    registry: ModelRegistry = inference.registry_of(request)
    name = params["name"]
    try:
        served = registry.resolve(name, params.get("version"))
    except ModelNotFound:
        if name not in registry and await v2_repository.on_disk(registry, name):
            raise ModelNotReady(f"model {name} is not loaded") from None
        raise
    if not served.batcher.accepting:
        raise ModelNotReady(f"model {served.model.key} is not accepting requests")
    if served.breaker.state is BreakerState.OPEN:
        raise ModelNotReady(f"model {served.model.key} is failing: its circuit is open")
    return json_answer({"name": served.name, "version": str(served.version), "ready": True})


async def infer(request: Request) -> Answer:
    """`POST /v2/models/{name}[/versions/{version}]/infer`, JSON or binary tensors."""
    served = await inference.resolve(request)
    with inference.admitted(request, served):  # or 503 at once, before the body is read
        body = await read_body(request, V2_TYPES)
        return await _infer(request, served, body)


async def _infer(request: Request, served: ServedVersion, body: bytes) -> Answer:
    header, data = binary.split(body, request.headers.get(binary.HEADER_LENGTH))

    def decoder() -> tuple[InferRequest, bool]:
        payload = parse_json(header)
        processed = prepare.v2_wants_processor(payload, served.config)
        specs = served.config.processor_inputs if processed else served.config.inputs
        assert specs is not None
        decoded = decode(payload, served.config, data, specs)
        inference.screen_text(request, served, decoded.inputs, specs, processed)
        return decoded, processed

    decoded, processed = await inference.decode(body, decoder)
    if not processed:
        result = await inference.run(request, served, decoded.inputs, decoded.rows)
    else:
        items = prepare.v2_items(decoded.inputs[0])
        prepared = await prepare.prepare(request, served, items)
        result = await inference.run(
            request, served, prepared.inputs, prepared.rows, material=prepared.keys
        )
    content, header_length = encode(result, decoded)
    headers = inference.cache_header(request, result)
    if header_length is None:
        return Answer(content, headers=headers)
    headers.append((b"inference-header-content-length", str(header_length).encode()))
    return Answer(content, BINARY, headers)


ROUTES = [
    route("/v2/models/{name}/infer", "POST", Policy.INFER, infer),
    route("/v2/models/{name}/versions/{version}/infer", "POST", Policy.INFER, infer),
    route("/v2", "GET", Policy.INFER, server_metadata),
    route("/v2/health/live", "GET", Policy.PROBE, live),
    route("/v2/health/ready", "GET", Policy.PROBE, ready),
    # before "/v2/models/{name}": "stats" is every model's statistics, as in Triton
    route("/v2/models/stats", "GET", Policy.INFER, statistics),
    route("/v2/models/{name}", "GET", Policy.INFER, metadata),
    route("/v2/models/{name}/versions/{version}", "GET", Policy.INFER, metadata),
    route("/v2/models/{name}/ready", "GET", Policy.INFER, model_ready),
    route("/v2/models/{name}/versions/{version}/ready", "GET", Policy.INFER, model_ready),
    route("/v2/models/{name}/config", "GET", Policy.INFER, config),
    route("/v2/models/{name}/versions/{version}/config", "GET", Policy.INFER, config),
    route("/v2/models/{name}/stats", "GET", Policy.INFER, statistics),
    route("/v2/models/{name}/versions/{version}/stats", "GET", Policy.INFER, statistics),
]

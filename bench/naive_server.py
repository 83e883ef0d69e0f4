"""The naive baseline `bench/run.py` compares torchgate with (owns only itself).

Written the way the source article serves a TorchScript model: FastAPI, `torch.jit.load`
at start-up, a pydantic `{"instances": [...]}` request model, and one `torch.no_grad()`
forward per request inside an `async def` endpoint, so the forward runs on the event loop
and nothing is batched. Keep it naive: it is the "before" of the benchmark.

    python bench/naive_server.py --model models/digits/1/model.pt --port 8001

The row's nesting depth comes from the `model.toml` next to the version folder (or
`--row-rank`), so pydantic validates every number as the article's typed model does.
"""

# No `from __future__ import annotations`: FastAPI must see the request model the endpoint
# is annotated with as a class, not as a string naming a local variable.
import argparse
import os
import tomllib
from pathlib import Path
from typing import Any

import torch
import uvicorn
from fastapi import FastAPI
from pydantic import BaseModel, create_model


def request_model(row_rank: int) -> type[BaseModel]:
    """`{"instances": list[row]}` where a row is `row_rank` nested lists of floats."""
    row: Any = float
    for _ in range(row_rank):
        row = list[row]
    return create_model("PredictRequest", instances=(list[row], ...))


def row_rank_of(model_path: Path) -> int:
    toml = model_path.resolve().parent.parent / "model.toml"
    config = tomllib.loads(toml.read_text(encoding="utf-8"))
    return len(config["inputs"][0]["shape"])


def build_app(model_path: Path, row_rank: int) -> FastAPI:
    app = FastAPI()
    model = torch.jit.load(str(model_path))
    model.eval()
    PredictRequest = request_model(row_rank)  # noqa: N806 - a class, named like one

    @app.post("/predict")
    async def predict(request: PredictRequest) -> dict[str, Any]:  # type: ignore[valid-type]
        x = torch.tensor(request.instances)  # type: ignore[attr-defined]
        with torch.no_grad():
            y = model(x)
        return {"predictions": y.tolist()}

    return app


def main() -> None:
    parser = argparse.ArgumentParser(description="the naive FastAPI baseline server")
    parser.add_argument("--model", type=Path, default=os.environ.get("NAIVE_MODEL_PATH"))
    parser.add_argument("--port", type=int, default=8001)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--row-rank", type=int, help="default: from the model's model.toml")
    parser.add_argument("--torch-threads", type=int, default=max(1, (os.cpu_count() or 2) // 2))
    args = parser.parse_args()
    if args.model is None:
        parser.error("give --model or set NAIVE_MODEL_PATH")
    torch.set_num_threads(args.torch_threads)
    row_rank = args.row_rank if args.row_rank is not None else row_rank_of(args.model)
    app = build_app(args.model, row_rank)
    uvicorn.run(
        app,
        host=args.host,
        port=args.port,
        workers=1,
        loop="uvloop",
        http="httptools",
        log_level="warning",
        access_log=False,
    )


if __name__ == "__main__":
    main()

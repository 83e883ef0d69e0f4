"""The naive embedding server `make bench-embeddings` compares torchgate with (owns only
itself): FastAPI and sentence-transformers as a tutorial writes them, `model.encode` on the
request's texts inside an `async def` endpoint (on the event loop, nothing batched across
requests), the answer in OpenAI's embeddings shape.

    python bench/naive_embeddings.py --model <sentence-transformers folder> --port 8002
"""

import argparse

import torch
import uvicorn
from fastapi import FastAPI
from pydantic import BaseModel
from sentence_transformers import SentenceTransformer


class EmbeddingsRequest(BaseModel):
    model: str = ""
    input: str | list[str]


def build(model_dir: str) -> FastAPI:
    model = SentenceTransformer(model_dir, device="cpu")
    app = FastAPI()

    @app.post("/v1/embeddings")
    async def embeddings(request: EmbeddingsRequest) -> dict:
        texts = [request.input] if isinstance(request.input, str) else request.input
        vectors = model.encode(texts, batch_size=32, normalize_embeddings=True)
        return {
            "object": "list",
            "data": [
                {"object": "embedding", "index": i, "embedding": v.tolist()}
                for i, v in enumerate(vectors)
            ],
            "model": request.model,
        }

    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--port", type=int, default=8002)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    uvicorn.run(build(args.model), host="127.0.0.1", port=args.port, log_level="warning")


if __name__ == "__main__":
    main()

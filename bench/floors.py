"""The floors `make bench` measures torchgate against (owns only them): what a server that
does nothing with the same request body answers, as a FastAPI route and as plain ASGI on
uvicorn. torchgate cannot be cheaper than these; the ratios say how close it comes.

    python bench/floors.py --kind fastapi|asgi --port 8003
"""

import argparse

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import Response

ANSWER = b'{"predictions": []}'


def fastapi_app() -> FastAPI:
    app = FastAPI(docs_url=None, redoc_url=None, openapi_url=None)

    @app.post("/predict")
    async def predict(request: Request) -> Response:
        await request.body()
        return Response(ANSWER, media_type="application/json")

    return app


async def asgi_app(scope, receive, send) -> None:
    if scope["type"] != "http":
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                await send({"type": message["type"] + ".complete"})
                if message["type"] == "lifespan.shutdown":
                    return
        return
    more = True
    while more:
        message = await receive()
        more = message.get("more_body", False)
    headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(ANSWER))]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": ANSWER})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kind", choices=["fastapi", "asgi"], required=True)
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    app = fastapi_app() if args.kind == "fastapi" else asgi_app
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning", access_log=False)


if __name__ == "__main__":
    main()

"""A request's body as the handlers read it: its media type checked, then its bytes."""

from __future__ import annotations

from starlette.requests import ClientDisconnect, Request

from torchgate.edge.context import header
from torchgate.errors import UnsupportedMediaType

JSON_TYPES = ("application/json",)
# V2 infer bodies: JSON, or JSON plus binary tensors. tritonclient.http sends no content type
# (taken as JSON), tritonclient.http.aio (aiohttp) sends application/octet-stream for both.
V2_TYPES = ("application/json", "application/octet-stream")
# V1 predict bodies: JSON, or one encoded image for a model with an image preprocessor
V1_TYPES = ("application/json", "image/jpeg", "image/png", "image/webp")


def media_type(request: Request) -> str:
    """The request's media type, lower case ("" when it sent none)."""
    content_type = header(request.scope, b"content-type")
    return content_type.split(";", 1)[0].strip().lower() if content_type else ""


async def read_body(request: Request, accept: tuple[str, ...] = JSON_TYPES) -> bytes:
    """The request body, after checking its content type (a missing one is taken as JSON).

    Read straight from ASGI `receive` (already size- and time-limited by the body
    middleware): Starlette's `Request.body()` goes through an async generator, which costs
    a small-model request more than the rest of its body handling."""
    media = media_type(request)
    if media and media not in accept:
        raise UnsupportedMediaType(
            f"content type {media[:64]!r} is not supported; send {' or '.join(accept)}"
        )
    receive = request.receive
    chunks = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientDisconnect()
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return chunks[0] if len(chunks) == 1 else b"".join(chunks)

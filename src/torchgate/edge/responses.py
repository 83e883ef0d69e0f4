"""Answers sent straight as ASGI messages: an error from the edge (which sends, never
raises), and `Answer`, the inference routes' response.

`Answer` does what Starlette's `Response` does for a body that is already bytes, without
its header normalisation: on a small model's request path that was a few percent of the
event loop's time."""

from __future__ import annotations

import orjson
from starlette.types import Send


async def send_error(
    send: Send, status: int, message: str, headers: dict[str, str] | None = None
) -> None:
    body = orjson.dumps({"error": message})
    raw = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        *((k.lower().encode(), v.encode()) for k, v in (headers or {}).items()),
    ]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})


JSON = b"application/json"
BINARY = b"application/octet-stream"


class Answer:
    """A complete response: status, bytes, content type and extra raw headers."""

    __slots__ = ("body", "content_type", "headers", "status")

    def __init__(
        self,
        body: bytes,
        content_type: bytes = JSON,
        headers: list[tuple[bytes, bytes]] | None = None,
        status: int = 200,
    ) -> None:
        self.body = body
        self.content_type = content_type
        self.headers = headers
        self.status = status

    async def __call__(self, scope: object, receive: object, send: Send) -> None:
        raw = [
            (b"content-type", self.content_type),
            (b"content-length", str(len(self.body)).encode()),
        ]
        if self.headers:
            raw += self.headers
        await send({"type": "http.response.start", "status": self.status, "headers": raw})
        await send({"type": "http.response.body", "body": self.body})

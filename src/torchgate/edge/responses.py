"""Answers sent straight as ASGI messages: `Answer`, every route's response; `json_answer`,
the one JSON renderer (bodies and `{"error": ...}` alike); `send_error`, for the edge, which
sends, never raises.

`Answer` does what Starlette's `Response` does for a body that is already bytes, without
its header normalisation, which on a small model's request path costs the event loop
time for nothing."""

from __future__ import annotations

import orjson
from starlette.types import Send

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


def json_answer(body: object, status: int = 200, headers: dict[str, str] | None = None) -> Answer:
    """`body` as JSON, with `status` and extra `headers`."""
    raw = [(k.lower().encode(), v.encode()) for k, v in headers.items()] if headers else None
    return Answer(orjson.dumps(body), JSON, raw, status)


def error_answer(status: int, message: str, headers: dict[str, str] | None = None) -> Answer:
    """`{"error": message}`: how torchgate answers every failure but the embeddings route's."""
    return json_answer({"error": message}, status, headers)


async def send_error(
    send: Send, status: int, message: str, headers: dict[str, str] | None = None
) -> None:
    await error_answer(status, message, headers)({}, None, send)

"""Refusing a request at the edge: send a JSON error response, never raise."""

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

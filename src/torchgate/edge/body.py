"""Request-body limits: size while it streams in, read timeout, no content encodings.

Runs before anything parses the body. A declared `Content-Length` over the limit is
refused at once; a body without one (chunked) is counted as it arrives and cut off at
the limit, so a 50 MiB upload never sits in memory. A body that trickles in slower than
`timeout_s` allows is cut off with 408. Compressed bodies are refused (415): nothing here
inflates data, so no compression bomb can expand in memory.
"""

from __future__ import annotations

import asyncio

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from torchgate.edge.context import header
from torchgate.edge.deadlines import Deadlines
from torchgate.edge.responses import send_error
from torchgate.errors import PayloadTooLarge, RequestTimeout
from torchgate.metrics import Metrics

_CLOSE = {"Connection": "close"}


class BodyLimitMiddleware:
    def __init__(self, app: ASGIApp, *, max_bytes: int, timeout_s: float, metrics: Metrics) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.timeout_s = timeout_s
        self.metrics = metrics
        self.deadlines = Deadlines(timeout_s)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        encoding = header(scope, b"content-encoding")
        if encoding and encoding.strip().lower() != "identity":
            self.metrics.refused.labels("content_encoding").inc()
            await send_error(send, 415, "compressed request bodies are not accepted", _CLOSE)
            return
        declared = header(scope, b"content-length")
        if declared is not None:
            if not declared.strip().isdigit():
                await send_error(send, 400, "invalid Content-Length", _CLOSE)
                return
            if int(declared) > self.max_bytes:
                self.metrics.refused.labels("too_large").inc()
                await send_error(send, 413, self._too_large(), _CLOSE)
                return
        deadlines = self.deadlines
        token = deadlines.watch()
        seen = 0
        done = False

        async def limited_receive() -> Message:
            nonlocal seen, done
            if done:  # the body is in: what comes next is the disconnect, wait as long as it takes
                return await receive()
            try:
                message = await receive()
            except asyncio.CancelledError:
                if deadlines.expired(token):
                    self.metrics.refused.labels("body_timeout").inc()
                    raise RequestTimeout(
                        f"request body not received within {self.timeout_s:g} s", headers=_CLOSE
                    ) from None
                raise
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    deadlines.release(token)
                    self.metrics.refused.labels("too_large").inc()
                    raise PayloadTooLarge(self._too_large(), headers=_CLOSE)
                done = not message.get("more_body", False)
            if done or message["type"] != "http.request":
                deadlines.release(token)
            return message

        try:
            await self.app(scope, limited_receive, send)
        finally:
            deadlines.release(token)

    def _too_large(self) -> str:
        return f"request body larger than {self.max_bytes} bytes"

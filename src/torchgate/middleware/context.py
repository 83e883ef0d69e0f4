"""Request id, W3C trace context, and the one access-log line per request."""

from __future__ import annotations

import itertools
import logging
import re
import secrets
import time
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from torchgate.logs import request_id
from torchgate.middleware.responses import send_error

log = logging.getLogger("torchgate.access")

_SAFE_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")
_TRACEPARENT = re.compile(r"^[0-9a-f]{2}-([0-9a-f]{32})-[0-9a-f]{16}-[0-9a-f]{2}$")


def header(scope: Scope, name: bytes) -> str | None:
    """The first value of a request header (`name` lower-case), decoded as latin-1."""
    for key, value in scope["headers"]:
        if key == name:
            return value.decode("latin-1")
    return None


class RequestContextMiddleware:
    """Gives every request an id (echoing a sane `X-Request-ID`) and logs it when done.

    Handlers add fields for the log line (model, rows, cache, timings) to `scope["state"]`.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        # ids are a random per-process prefix and a counter: unique, and no syscall per request
        self._prefix = secrets.token_hex(8)
        self._counter = itertools.count(1)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        given = header(scope, b"x-request-id")
        rid = (
            given if given and _SAFE_ID.match(given) else f"{self._prefix}{next(self._counter):08x}"
        )
        state: dict[str, Any] = scope.setdefault("state", {})
        state["request_id"] = rid
        trace = header(scope, b"traceparent")
        match = _TRACEPARENT.match(trace) if trace else None
        token = request_id.set(rid)
        status = 500
        responded = False

        async def send_with_id(message: Message) -> None:
            nonlocal status, responded
            if message["type"] == "http.response.start":
                status = message["status"]
                responded = True
                message["headers"] = [*message.get("headers", []), (b"x-request-id", rid.encode())]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except Exception:
            # escaped every handler (a bug in a middleware): still a JSON answer, and the
            # server logs the exception as it does for any other
            if not responded:
                state["error"] = "internal"
                await send_error(send_with_id, 500, "internal server error")
            raise
        finally:
            if log.isEnabledFor(logging.INFO):
                _log_request(scope, state, status, started, match)
            request_id.reset(token)


def _log_request(
    scope: Scope, state: dict[str, Any], status: int, started: float, trace: re.Match[str] | None
) -> None:
    """The access-log line: built only when it will be written."""
    fields = {
        "method": scope["method"],
        "path": scope["path"],
        "status": status,
        "total_ms": round((time.perf_counter() - started) * 1000, 3),
    }
    if trace:
        fields["trace_id"] = trace.group(1)
    for key in (
        "model",
        "version",
        "rows",
        "cache",
        "tokens",
        "preprocess_ms",
        "queue_ms",
        "compute_ms",
        "key_name",
    ):
        if key in state:
            fields[key] = state[key]
    if "error" in state:
        fields["error"] = state["error"]
    log.info("request", extra=fields)

"""`RequestContext`, and the outermost layer that makes it: the request id, W3C trace id,
the matched route, and the one access-log line per request."""

from __future__ import annotations

import itertools
import logging
import re
import secrets
import time
from dataclasses import dataclass, field
from typing import Any

from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from torchgate.api.routes import Route, RouteTable
from torchgate.edge.responses import send_error
from torchgate.keys import ApiKey
from torchgate.logs import request_id

log = logging.getLogger("torchgate.access")

_SAFE_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")
_TRACEPARENT = re.compile(r"^[0-9a-f]{2}-([0-9a-f]{32})-[0-9a-f]{16}-[0-9a-f]{2}$")
_LOGGED = ("model", "version", "rows", "cache", "tokens", "preprocess_ms", "queue_ms", "compute_ms")


def header(scope: Scope, name: bytes) -> str | None:
    """The first value of a request header (`name` lower-case), decoded as latin-1."""
    ctx = scope.get("torchgate")
    if ctx is not None:  # one dict of the headers per request, not a scan per lookup
        value = ctx.request_headers.get(name)
        return None if value is None else value.decode("latin-1")
    for key, value in scope["headers"]:
        if key == name:
            return value.decode("latin-1")
    return None


@dataclass(slots=True)
class RequestContext:
    """What one request is and what serving it found out, for every layer and the log."""

    request_id: str
    started: float  # perf_counter, for durations
    arrived: float  # time.monotonic, the clock deadlines are kept by
    route: Route | None
    params: dict[str, str]
    request_headers: dict[bytes, bytes]  # the first value of each, by lower-case name
    allowed: frozenset[str] = frozenset()  # a known path's methods, when this one is not
    key: ApiKey | None = None
    status: int = 500
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)  # added to the answer
    # found out on the way, for the access log and the metrics
    model: str | None = None
    version: int | None = None
    canary: Any = None
    rows: int | None = None
    cache: str | None = None
    cache_visible: bool = True
    tokens: int | None = None
    preprocess_ms: float | None = None
    queue_ms: float | None = None
    compute_ms: float | None = None
    error: str | None = None

    @property
    def key_name(self) -> str | None:
        return None if self.key is None else self.key.name


def context(request: Request) -> RequestContext:
    """The context of the request being served (made by `RequestContextMiddleware`)."""
    return request.scope["torchgate"]


class RequestContextMiddleware:
    """Gives every request an id (echoing a sane `X-Request-ID`), matches its route once,
    and logs it when done; an exception that escapes every handler is still a JSON 500."""

    def __init__(self, app: ASGIApp, *, routes: RouteTable) -> None:
        self.app = app
        self.routes = routes
        # ids are a random per-process prefix and a counter: unique, and no syscall each
        self._prefix = secrets.token_hex(8)
        self._counter = itertools.count(1)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        headers = dict(reversed(scope["headers"]))  # reversed: the first of a repeated one
        given = headers.get(b"x-request-id")
        given_id = given.decode("latin-1") if given else None
        rid = (
            given_id
            if given_id and _SAFE_ID.match(given_id)
            else f"{self._prefix}{next(self._counter):08x}"
        )
        found = self.routes.match(scope["method"], scope["path"])
        ctx = RequestContext(
            rid, started, time.monotonic(), found.route, found.params, headers, found.allowed
        )
        scope["torchgate"] = ctx
        token = request_id.set(rid)
        rid_header = (b"x-request-id", rid.encode())
        responded = False

        async def send_with_id(message: Message) -> None:
            nonlocal responded
            if message["type"] == "http.response.start":
                ctx.status = message["status"]
                responded = True
                message["headers"] = [*message.get("headers", ()), rid_header, *ctx.headers]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except Exception:
            # escaped every handler (a bug in a layer): still a JSON answer, and the server
            # logs the exception as it does for any other
            if not responded:
                ctx.error = "internal"
                await send_error(send_with_id, 500, "internal server error")
            raise
        finally:
            if log.isEnabledFor(logging.INFO):
                _log_request(scope, ctx)
            request_id.reset(token)


def _log_request(scope: Scope, ctx: RequestContext) -> None:
    """The access-log line: built only when it will be written."""
    fields: dict[str, Any] = {
        "method": scope["method"],
        "path": scope["path"],
        "status": ctx.status,
        "total_ms": round((time.perf_counter() - ctx.started) * 1000, 3),
    }
    trace = header(scope, b"traceparent")
    if trace:
        match = _TRACEPARENT.match(trace)
        if match:
            fields["trace_id"] = match.group(1)
    for key in _LOGGED:
        value = getattr(ctx, key)
        if value is not None:
            fields[key] = value
    if ctx.key is not None:
        fields["key_name"] = ctx.key.name
    if ctx.error is not None:
        fields["error"] = ctx.error
    # makeRecord and handle, as log.info would without walking the stack for a caller's
    # file and line, which no line of ours prints and which is the dearest part of it
    log.handle(log.makeRecord(log.name, logging.INFO, "", 0, "request", (), None, extra=fields))

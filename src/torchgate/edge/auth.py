"""API-key authentication and scopes, by the matched route's policy."""

from __future__ import annotations

from starlette.types import ASGIApp, Receive, Scope, Send

from torchgate.api.routes import Policy
from torchgate.edge.context import header
from torchgate.edge.responses import send_error
from torchgate.keys import KeyStore

_UNAUTHORIZED = {"WWW-Authenticate": "Bearer"}


def presented_key(scope: Scope) -> str | None:
    """The key from `Authorization: Bearer <key>` or `X-API-Key: <key>`."""
    authorization = header(scope, b"authorization")
    if authorization:
        kind, _, value = authorization.partition(" ")
        if kind.lower() == "bearer" and value.strip():
            return value.strip()
    return header(scope, b"x-api-key") or None


class AuthMiddleware:
    """401 for a missing or unknown key, 403 for a key without the route's scope.

    `PROBE` routes are always open, `OBSERVABILITY` ones unless `metrics_open` is false;
    an unknown path or method needs no key (its 404 or 405 tells nothing). The key (its
    name and limits, never the key) goes into the request context for logs and limits."""

    def __init__(self, app: ASGIApp, *, keys: KeyStore, metrics_open: bool = True) -> None:
        self.app = app
        self.keys = keys
        self.open = {Policy.PROBE, Policy.OBSERVABILITY} if metrics_open else {Policy.PROBE}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        ctx = scope["torchgate"]
        route = ctx.route
        if route is None or route.policy in self.open:
            await self.app(scope, receive, send)
            return
        presented = presented_key(scope)
        key = self.keys.lookup(presented) if presented else None
        if key is None:
            message = "unknown API key" if presented else "missing API key"
            await send_error(send, 401, message, _UNAUTHORIZED)
            return
        needed = "admin" if route.policy is Policy.ADMIN else "infer"  # admin includes infer
        if needed not in key.scopes and "admin" not in key.scopes:
            await send_error(send, 403, f"this key lacks the {needed!r} scope")
            return
        ctx.key = key
        await self.app(scope, receive, send)

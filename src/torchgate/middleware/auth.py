"""API-key authentication and scopes, before anything else looks at the request."""

from __future__ import annotations

from starlette.types import ASGIApp, Receive, Scope, Send

from torchgate.keys import KeyStore
from torchgate.middleware.context import header
from torchgate.middleware.responses import send_error

PROBES = frozenset({"/health", "/health/ready", "/v2/health/live", "/v2/health/ready"})
OBSERVABILITY = frozenset({"/metrics", "/dashboard", "/dashboard/data"})
ADMIN_PREFIXES = ("/v2/repository", "/admin")
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

    Probes are always open; `/metrics` and `/dashboard` are open unless `metrics_open` is
    false. The key's name (never the key) goes into `scope["state"]` for logs and limits.
    """

    def __init__(self, app: ASGIApp, *, keys: KeyStore, metrics_open: bool = True) -> None:
        self.app = app
        self.keys = keys
        self.open_paths = PROBES | OBSERVABILITY if metrics_open else PROBES

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in self.open_paths:
            await self.app(scope, receive, send)
            return
        presented = presented_key(scope)
        key = self.keys.lookup(presented) if presented else None
        if key is None:
            message = "unknown API key" if presented else "missing API key"
            await send_error(send, 401, message, _UNAUTHORIZED)
            return
        needed = "admin" if scope["path"].startswith(ADMIN_PREFIXES) else "infer"
        if needed not in key.scopes and "admin" not in key.scopes:  # admin includes infer
            await send_error(send, 403, f"this key lacks the {needed!r} scope")
            return
        state = scope.setdefault("state", {})
        state["key_name"] = key.name
        state["rate_limit"] = key.rate_limit
        state["tokens_per_minute"] = key.tokens_per_minute
        await self.app(scope, receive, send)

"""`Dispatcher`: the innermost layer, which calls the matched route's handler.

An unknown path is a 404 and another method on a known path a 405 with `Allow`, both from
the route table's match. A failure the handler raises is rendered by `api.errors.render`
as the JSON the rest of torchgate answers with. The lifespan goes on to FastAPI.
"""

from __future__ import annotations

from starlette.requests import Request
from starlette.types import ASGIApp, Receive, Scope, Send

from torchgate.api.errors import render
from torchgate.edge.responses import send_error


class Dispatcher:
    def __init__(self, fallback: ASGIApp) -> None:
        self.fallback = fallback  # FastAPI's stack, for the lifespan

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.fallback(scope, receive, send)
            return
        ctx = scope["torchgate"]
        route = ctx.route
        if route is None:
            if ctx.allowed:
                allow = ", ".join(sorted(ctx.allowed))
                await send_error(send, 405, "method not allowed", {"Allow": allow})
            else:
                await send_error(send, 404, "not found")
            return
        request = Request(scope, receive)
        try:
            response = await route.handler(request)
        except Exception as exc:
            response = render(request, exc)
        await response(scope, receive, send)

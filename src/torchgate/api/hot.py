"""`HotRoutes`: the inference routes, answered before FastAPI's own stack sees them.

Every POST to an inference path is matched here, inside torchgate's middleware (request
id, metrics, auth, rate limit, body limits) but outside FastAPI's exception middleware,
exit stack and router, which cost a predict request about a fifth of its event-loop time
on a small model. Errors are rendered by the same `api.errors.render` as everywhere else.
Other requests, and other methods on these paths (405), go on to FastAPI.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable

from fastapi import FastAPI
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from torchgate.api.errors import render

Handler = Callable[[Request, str | None, str | None], Awaitable[Response]]


def _pattern(template: str) -> re.Pattern[str]:
    """`/v1/models/{name}:predict` -> a regex with named groups, as Starlette matches."""
    parts = re.split(r"\{(\w+)\}", template)
    regex = "".join(
        re.escape(part) if i % 2 == 0 else f"(?P<{part}>[^/]+)" for i, part in enumerate(parts)
    )
    return re.compile(f"^{regex}$")


def add_fallback_routes(app: FastAPI, routes: list[tuple[str, Handler]]) -> None:
    """The same routes in FastAPI's router, so that another method on them is a 405."""
    for template, handler in routes:
        app.add_route(template, _endpoint(handler), methods=["POST"])


def _endpoint(handler: Handler) -> Callable[[Request], Awaitable[Response]]:
    async def endpoint(request: Request) -> Response:
        params = request.path_params
        return await handler(request, params.get("name"), params.get("version"))

    return endpoint


class HotRoutes:
    def __init__(self, app: ASGIApp, *, routes: list[tuple[str, Handler]]) -> None:
        self.app = app
        self.routes = [(_pattern(t), t, handler) for t, handler in routes]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST":
            path = scope["path"]
            for pattern, template, handler in self.routes:
                match = pattern.match(path)
                if match is not None:
                    scope["route_template"] = template
                    request = Request(scope, receive)
                    params = match.groupdict()
                    try:
                        response = await handler(request, params.get("name"), params.get("version"))
                    except Exception as exc:
                        response = render(request, exc)
                    await response(scope, receive, send)
                    return
        await self.app(scope, receive, send)

"""The rate-limit layer: 429 with `Retry-After` over a key's limit (an address's, with auth
off), and the rate-limit fields on every limited answer; routes whose policy is `PROBE` or
`OBSERVABILITY` are never limited."""

from __future__ import annotations

from starlette.types import ASGIApp, Receive, Scope, Send

from torchgate.api.routes import Policy
from torchgate.edge.limiter import RateLimiter
from torchgate.edge.responses import send_error

_LIMITED = (Policy.INFER, Policy.ADMIN)


class RateLimitMiddleware:
    def __init__(self, app: ASGIApp, *, limiter: RateLimiter) -> None:
        self.app = app
        self.limiter = limiter

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        ctx = scope["torchgate"]
        route = ctx.route
        if route is None or route.policy not in _LIMITED:
            await self.app(scope, receive, send)
            return
        key = ctx.key
        if key is not None:
            identity, spec = "key:" + key.name, key.rate_limit
        else:
            client = scope.get("client")
            identity, spec = f"ip:{client[0] if client else 'unknown'}", None
        limiter = self.limiter
        if limiter.shared:
            decision = await limiter.hit(identity, spec)
        else:
            decision = limiter.hit_local(identity, spec)
        if not decision.allowed:
            limiter.metrics.ratelimit_rejections.labels(decision.policy).inc()
            await send_error(
                send,
                429,
                f"rate limit of {decision.limit} requests per {decision.window_s} s exceeded",
                {"Retry-After": str(decision.reset_s), **decision.header_dict()},
            )
            return
        ctx.headers += decision.headers()
        await self.app(scope, receive, send)

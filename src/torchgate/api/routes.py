"""The route table: every route torchgate answers, declared once, each with its policy.

A `Route` is a path template, its methods, its handler and a `Policy`; the edge matches a
request against the table once, and every step of the edge (auth, rate limit, metrics,
body limits, the access log) reads the matched route's policy instead of matching paths
of its own. A route cannot be declared without a policy, and a route under `/admin` or
`/v2/repository`, or whose handler is marked `admin_only`, cannot be declared with any
policy but `ADMIN`. Another method on a known path is a 405 from the same table (with
`Allow`), an unknown path a 404.

Handlers take the request and answer a response (anything ASGI can send). FastAPI's
own router serves nothing: `check` refuses an app with a route added there (it would
have no policy).
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from starlette.requests import Request
from starlette.types import ASGIApp

Handler = Callable[[Request], Awaitable[ASGIApp]]  # the answer: a response, sent as ASGI
ADMIN_PATHS = ("/admin", "/v2/repository")


class Policy(Enum):
    PROBE = "probe"  # no key, never rate limited: liveness and readiness
    OBSERVABILITY = "observability"  # /metrics, /dashboard: a key only if configured so
    INFER = "infer"  # a key with the infer scope; rate limited; counted per model
    ADMIN = "admin"  # a key with the admin scope; rate limited


def admin_only(handler: Handler) -> Handler:
    """Mark a handler as one only the `ADMIN` policy may serve."""
    handler.admin_only = True  # type: ignore[attr-defined]
    return handler


@dataclass(frozen=True, slots=True)
class Route:
    template: str
    methods: frozenset[str]
    handler: Handler
    policy: Policy
    pattern: re.Pattern[str] | None = field(init=False, compare=False, default=None)

    def __post_init__(self) -> None:
        if not isinstance(self.policy, Policy):
            raise TypeError(f"route {self.template}: policy must be a Policy, not {self.policy!r}")
        admin = self.template.startswith(ADMIN_PATHS) or getattr(self.handler, "admin_only", False)
        if admin and self.policy is not Policy.ADMIN:
            raise ValueError(f"route {self.template} is an admin route: its policy must be ADMIN")
        if not self.methods:
            raise ValueError(f"route {self.template} has no methods")
        if "{" in self.template:
            object.__setattr__(self, "pattern", _pattern(self.template))


def route(template: str, methods: str, policy: Policy, handler: Handler) -> Route:
    """`route("/v2/models/{name}", "GET", Policy.INFER, metadata)`; methods comma-separated."""
    return Route(template, frozenset(m.strip() for m in methods.split(",")), handler, policy)


def _pattern(template: str) -> re.Pattern[str]:
    """`/v1/models/{name}:predict` -> a regex with named groups, as Starlette matches."""
    parts = re.split(r"\{(\w+)\}", template)
    regex = "".join(
        re.escape(part) if i % 2 == 0 else f"(?P<{part}>[^/]+)" for i, part in enumerate(parts)
    )
    return re.compile(f"^{regex}$")


@dataclass(slots=True)
class Match:
    """A request's route (None: unknown path, or no route for its method) and the path
    parameters; for a known path with another method, the methods it has."""

    route: Route | None
    params: dict[str, str]
    allowed: frozenset[str] = frozenset()


_NOWHERE = Match(None, {})


class RouteTable:
    """Routes by exact path (a dict lookup) and by first path segment (regexes in order)."""

    def __init__(self, routes: Iterable[Route]) -> None:
        self.routes = list(routes)
        seen: set[tuple[str, str]] = set()
        self._exact: dict[str, list[Route]] = {}
        self._by_segment: dict[str, list[Route]] = {}
        for r in self.routes:
            for method in r.methods:
                if (r.template, method) in seen:
                    raise ValueError(f"route {method} {r.template} is declared twice")
                seen.add((r.template, method))
            if r.pattern is None:
                self._exact.setdefault(r.template, []).append(r)
            else:
                self._by_segment.setdefault(_segment(r.template), []).append(r)

    def match(self, method: str, path: str) -> Match:
        wanted = "GET" if method == "HEAD" else method
        allowed: set[str] = set()
        for r in self._exact.get(path, ()):
            if wanted in r.methods:
                return Match(r, {})
            allowed |= r.methods
        for r in self._by_segment.get(_segment(path), ()):
            assert r.pattern is not None
            found = r.pattern.match(path)
            if found is None:
                continue
            if wanted in r.methods:
                return Match(r, found.groupdict())
            allowed |= r.methods
        if not allowed:
            return _NOWHERE
        if "GET" in allowed:
            allowed.add("HEAD")
        return Match(None, {}, frozenset(allowed))

    def check(self, app: Any) -> None:
        """FastAPI's router must hold no route: one added there would have no policy (and
        would never be reached: the dispatcher answers every path from this table)."""
        for path, methods in _fastapi_routes(app.router.routes):
            for method in sorted(methods - {"HEAD"}):
                raise ValueError(
                    f"route {method} {path} has no policy: declare it in the route table"
                )


def _fastapi_routes(routes: Iterable[Any], prefix: str = "") -> Iterable[tuple[str, set[str]]]:
    """(path, methods) of FastAPI's routes, those of included routers too (FastAPI keeps
    an included router as one entry holding the original)."""
    for found in routes:
        path = getattr(found, "path", None)
        if path is not None:
            yield prefix + path, set(getattr(found, "methods", None) or ())
            continue
        original = getattr(found, "original_router", None)
        if original is not None:
            yield from _fastapi_routes(original.routes, prefix + getattr(original, "prefix", ""))


def _segment(path: str) -> str:
    return path[1:].split("/", 1)[0]

"""The built-in live dashboard: `GET /dashboard` (one self-contained page, no CDN) and
`GET /dashboard/data` (the sampler's recent samples as JSON, which the page polls).

The page's script is inlined into its HTML, so the dashboard is one request under the same
access rule as `/metrics`, and a Content-Security-Policy that allows only that script and
style (by hash) and requests back to this server.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import math
import re
from dataclasses import dataclass
from importlib import resources

from starlette.requests import Request
from starlette.responses import Response

from torchgate.api.routes import Policy, route
from torchgate.edge.responses import Answer, json_answer
from torchgate.errors import BadRequest
from torchgate.sampler import Sampler

_SCRIPT_TAG = '<script src="dashboard.js"></script>'
_STYLE = re.compile(r"<style>(.*?)</style>", re.DOTALL)


@dataclass(frozen=True, slots=True)
class Page:
    body: bytes
    csp: str


def _hash(text: str) -> str:
    digest = base64.b64encode(hashlib.sha256(text.encode()).digest()).decode()
    return f"'sha256-{digest}'"


@functools.cache
def page() -> Page:
    """The HTML with its script inlined, and the policy that allows exactly those two."""
    static = resources.files("torchgate") / "static"
    html = (static / "dashboard.html").read_text(encoding="utf-8")
    script = (static / "dashboard.js").read_text(encoding="utf-8")
    if _SCRIPT_TAG not in html or "</script" in script:
        raise RuntimeError("static/dashboard.html must load dashboard.js with one plain tag")
    html = html.replace(_SCRIPT_TAG, f"<script>{script}</script>")
    styles = " ".join(_hash(s) for s in _STYLE.findall(html))
    csp = (
        f"default-src 'none'; script-src {_hash(script)}; style-src {styles}; "
        "connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'; "
        "frame-ancestors 'none'"
    )
    return Page(html.encode(), csp)


async def dashboard(request: Request) -> Response:
    """`GET /dashboard`: the live dashboard of this server (HTML)."""
    current = page()
    return Response(
        current.body,
        media_type="text/html; charset=utf-8",
        headers={
            "Content-Security-Policy": current.csp,
            "Cache-Control": "no-cache",
            "X-Content-Type-Options": "nosniff",
            "Referrer-Policy": "no-referrer",
        },
    )


async def dashboard_data(request: Request) -> Answer:
    """`GET /dashboard/data`: the recent per-second samples, all of them, or with the
    `boot` of the last answer only those after `since`."""
    boot = request.query_params.get("boot")
    raw_since = request.query_params.get("since")
    if boot is not None and len(boot) > 64:
        raise BadRequest("boot: at most 64 characters")
    try:
        since = None if raw_since is None else float(raw_since)
    except ValueError:
        raise BadRequest("since: must be a number of seconds") from None
    if since is not None and not math.isfinite(since):
        raise BadRequest("since: must be a number of seconds")
    sampler: Sampler | None = getattr(request.app.state, "sampler", None)
    if sampler is None:
        body: dict[str, object] = {"boot": None, "samples": [], "now": None}
    else:
        incremental = boot == sampler.boot and since is not None
        body = {
            "boot": sampler.boot,
            "interval_s": sampler.interval_s,
            "window": sampler.window,
            "now": sampler.now,
            "samples": sampler.since(since if incremental else None),
        }
    return json_answer(body, headers={"Cache-Control": "no-store"})


ROUTES = [
    route("/dashboard", "GET", Policy.OBSERVABILITY, dashboard),
    route("/dashboard/data", "GET", Policy.OBSERVABILITY, dashboard_data),
]

"""One place that turns every failure into `{"error": "..."}` with the right status."""

from __future__ import annotations

import logging

import orjson
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response

from torchgate.errors import TorchgateError

log = logging.getLogger("torchgate.errors")


def error_response(status: int, message: str, headers: dict[str, str] | None = None) -> Response:
    body = orjson.dumps({"error": message})
    return Response(body, status_code=status, media_type="application/json", headers=headers)


def render(request: Request, exc: Exception) -> Response:
    """The answer to a failure of a handler (the dispatcher renders every one so)."""
    if isinstance(exc, TorchgateError):
        _note(request, exc.message)
        return error_response(exc.status_code, exc.message, exc.headers)
    if isinstance(exc, ClientDisconnect):
        # the client left while its body was being read: nothing to answer, nothing broken
        _note(request, "client disconnected")
        return error_response(499, "client closed the request")
    log.error("unhandled error", exc_info=exc, extra={"path": request.url.path})
    _note(request, "internal")
    return error_response(500, "internal server error")


def _note(request: Request, error: str) -> None:
    """The error, for the access log."""
    ctx = request.scope.get("torchgate")
    if ctx is not None:
        ctx.error = error

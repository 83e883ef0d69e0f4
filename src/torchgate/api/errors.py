"""One place that turns every failure into `{"error": "..."}` with the right status."""

from __future__ import annotations

import logging

from starlette.requests import ClientDisconnect, Request

from torchgate.edge.responses import Answer, error_answer
from torchgate.errors import TorchgateError

log = logging.getLogger("torchgate.errors")


def render(request: Request, exc: Exception) -> Answer:
    """The answer to a failure of a handler (the dispatcher renders every one so)."""
    if isinstance(exc, TorchgateError):
        _note(request, exc.message)
        return error_answer(exc.status_code, exc.message, exc.headers)
    if isinstance(exc, ClientDisconnect):
        # the client left while its body was being read: nothing to answer, nothing broken
        _note(request, "client disconnected")
        return error_answer(499, "client closed the request")
    log.error("unhandled error", exc_info=exc, extra={"path": request.url.path})
    _note(request, "internal")
    return error_answer(500, "internal server error")


def _note(request: Request, error: str) -> None:
    """The error, for the access log."""
    ctx = request.scope.get("torchgate")
    if ctx is not None:
        ctx.error = error

"""One place that turns every failure into `{"error": "..."}` with the right status."""

from __future__ import annotations

import logging

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect
from starlette.responses import Response

from torchgate import problems
from torchgate.errors import TorchgateError

log = logging.getLogger("torchgate.errors")


def error_response(status: int, message: str, headers: dict[str, str] | None = None) -> Response:
    body = orjson.dumps({"error": message})
    return Response(body, status_code=status, media_type="application/json", headers=headers)


def render(request: Request, exc: Exception) -> Response:
    """The answer to a failure of the request path (the dispatcher's and FastAPI's)."""
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


def install(app: FastAPI) -> None:
    @app.exception_handler(TorchgateError)
    async def _known(request: Request, exc: TorchgateError) -> Response:
        return render(request, exc)

    @app.exception_handler(HTTPException)
    async def _http(request: Request, exc: HTTPException) -> Response:
        message = {404: "not found", 405: "method not allowed"}.get(exc.status_code)
        return error_response(exc.status_code, message or str(exc.detail), exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> Response:
        return error_response(400, f"invalid request: {problems.describe(exc)}")

    @app.exception_handler(ClientDisconnect)
    async def _gone(request: Request, exc: ClientDisconnect) -> Response:
        return render(request, exc)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> Response:
        return render(request, exc)

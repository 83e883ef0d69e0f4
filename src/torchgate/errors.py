"""The error hierarchy: every failure a client can see, each knowing its status code.

One handler (`api.errors`) renders them as `{"error": "..."}`; anything that is not a
`TorchgateError` is logged with its stack and answered as a plain 500.
"""

from __future__ import annotations

import math


class TorchgateError(Exception):
    """A failure with a status code and a message that is safe to show the client."""

    status_code = 500

    def __init__(self, message: str, *, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.headers = headers or {}


class BadRequest(TorchgateError):
    status_code = 400


class Forbidden(TorchgateError):
    status_code = 403


class ModelNotFound(TorchgateError):
    status_code = 404


class RequestTimeout(TorchgateError):
    status_code = 408


class PayloadTooLarge(TorchgateError):
    status_code = 413


class UnsupportedMediaType(TorchgateError):
    status_code = 415


class ClientDisconnected(TorchgateError):
    """The client went away before its batch ran; the answer goes nowhere."""

    status_code = 499

    def __init__(self) -> None:
        super().__init__("client closed the request before it was computed")


class InferenceFailed(TorchgateError):
    """The model raised while computing this request. `input_fault`: the model still worked
    meanwhile (the other requests of its batch succeeded, or a probe on known-good input
    did), so this request's input, not the model, is at fault as far as anyone can tell."""

    status_code = 500

    def __init__(self, message: str, *, input_fault: bool = False) -> None:
        super().__init__(message)
        self.input_fault = input_fault


class Unavailable(TorchgateError):
    """503 with a Retry-After: the server cannot take this request now, try again later."""

    status_code = 503

    def __init__(self, message: str, *, retry_after_s: float = 1.0) -> None:
        super().__init__(message, headers={"Retry-After": str(max(1, math.ceil(retry_after_s)))})
        self.retry_after_s = retry_after_s


class QueueFull(Unavailable):
    pass


class Overloaded(Unavailable):
    """Refused before its body was read: the model has as many requests as it can serve."""


class CircuitOpen(Unavailable):
    pass


class ModelNotReady(Unavailable):
    pass


class Draining(Unavailable):
    def __init__(self, message: str = "server is shutting down") -> None:
        super().__init__(message, retry_after_s=1)


class RateLimited(TorchgateError):
    status_code = 429


class DeadlineExceeded(TorchgateError):
    status_code = 504


class ModelLoadError(Exception):
    """A model folder that cannot be served; the message names the file and the problem."""

    def __init__(self, path: object, problem: str) -> None:
        super().__init__(f"{path}: {problem}")
        self.path = path
        self.problem = problem

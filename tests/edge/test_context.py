"""The outermost middleware: an exception that escapes every handler still gets a JSON
500 with the request id, and an answer already sent is never followed by another."""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
import pytest

from torchgate.api.routes import RouteTable
from torchgate.edge.context import RequestContextMiddleware

SCOPE = {"type": "http", "method": "POST", "path": "/predict", "headers": []}


async def _receive() -> dict[str, Any]:
    return {"type": "http.request", "body": b"{}", "more_body": False}


def _call(app: Any) -> list[dict[str, Any]]:
    sent: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    with pytest.raises(RuntimeError, match="a bug"):
        asyncio.run(
            RequestContextMiddleware(app, routes=RouteTable([]))(dict(SCOPE), _receive, send)
        )
    return sent


def test_an_exception_before_any_answer_is_a_json_500_with_the_request_id():
    async def broken(scope: Any, receive: Any, send: Any) -> None:
        raise RuntimeError("a bug")

    start, body = _call(broken)
    headers = dict(start["headers"])
    assert start["status"] == 500
    assert headers[b"content-type"] == b"application/json"
    assert headers[b"x-request-id"]
    assert orjson.loads(body["body"]) == {"error": "internal server error"}


def test_an_exception_after_the_answer_sends_nothing_more():
    async def answers_then_breaks(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})
        raise RuntimeError("a bug")

    sent = _call(answers_then_breaks)
    assert [m["type"] for m in sent] == ["http.response.start", "http.response.body"]
    assert sent[0]["status"] == 200

"""The route table: one declaration per route with its policy; 404 and 405 from it; no
route without a policy, and no admin route without the admin policy."""

from __future__ import annotations

import httpx
import pytest
from fastapi import APIRouter

from tests.support import ServerThread
from torchgate.api.routes import Policy, Route, RouteTable, admin_only, route
from torchgate.app import ROUTES, create_app


async def handler(request):  # pragma: no cover - never called
    raise AssertionError


def test_every_route_is_declared_once_with_a_policy():
    table = RouteTable(ROUTES)
    assert all(isinstance(r.policy, Policy) for r in table.routes)
    with pytest.raises(TypeError):
        Route("/x", frozenset({"GET"}), handler)  # type: ignore[call-arg]
    with pytest.raises(TypeError, match="policy must be a Policy"):
        route("/x", "GET", "infer", handler)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="declared twice"):
        RouteTable([route("/x", "GET", Policy.INFER, handler)] * 2)


@pytest.mark.parametrize("policy", [Policy.INFER, Policy.PROBE, Policy.OBSERVABILITY])
def test_an_admin_route_cannot_be_declared_without_the_admin_policy(policy):
    for template in ("/admin/models/{name}/retrain", "/v2/repository/models/{name}/wipe"):
        with pytest.raises(ValueError, match="admin route"):
            route(template, "POST", policy, handler)
    with pytest.raises(ValueError, match="admin route"):
        route("/ops/reload", "POST", policy, admin_only(handler))
    assert route("/ops/reload", "POST", Policy.ADMIN, admin_only(handler)).policy is Policy.ADMIN


def test_a_fastapi_route_without_a_policy_is_refused_at_start_up(make_settings):
    app = create_app(make_settings())
    extra = APIRouter()
    extra.add_api_route("/admin/secret", handler, methods=["GET"])
    app.include_router(extra)
    with pytest.raises(ValueError, match="GET /admin/secret has no policy"):
        app.routes_table.check(app)


def test_matching():
    table = RouteTable(ROUTES)
    found = table.match("POST", "/v1/models/digits:predict")
    assert found.route is not None and found.route.template == "/v1/models/{name}:predict"
    assert found.params == {"name": "digits"}
    found = table.match("POST", "/v2/models/digits/versions/2/infer")
    assert found.params == {"name": "digits", "version": "2"}
    found = table.match("GET", "/v1/models/digits")
    assert found.route is not None and found.route.policy is Policy.INFER
    assert table.match("HEAD", "/health").route is not None
    assert table.match("DELETE", "/predict").allowed == frozenset({"POST"})
    assert table.match("GET", "/nowhere").route is None


@pytest.mark.slow
def test_404_and_405_come_from_the_table(digits_server):
    url = digits_server.url
    answer = httpx.get(url + "/predict")
    assert answer.status_code == 405 and answer.headers["allow"] == "POST"
    assert answer.json() == {"error": "method not allowed"}
    answer = httpx.delete(url + "/v2/models/digits/infer")
    assert answer.status_code == 405
    answer = httpx.get(url + "/no/such/thing")
    assert answer.status_code == 404 and answer.json() == {"error": "not found"}
    assert "x-request-id" in answer.headers
    text = httpx.get(url + "/metrics").text
    assert 'route="unmatched"' in text


@pytest.mark.slow
def test_middleware_added_by_a_user_sees_the_inference_routes(make_settings):
    seen: list[str] = []

    class Spy:
        def __init__(self, app):
            self.app = app

        async def __call__(self, scope, receive, send):
            if scope["type"] == "http":
                seen.append(scope["path"])
            await self.app(scope, receive, send)

    server = ServerThread(make_settings())
    server.app.add_middleware(Spy)
    body = {"instances": [[[[0.0] * 8] * 8]]}
    with server:
        assert httpx.post(server.url + "/predict", json=body).status_code == 200
    assert seen == ["/predict"]

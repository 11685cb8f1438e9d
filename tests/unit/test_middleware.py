"""Request metrics label by route, whatever path the client sent: templates by their template, the rest 'other'."""

from __future__ import annotations

from prometheus_client import CollectorRegistry
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route
from starlette.testclient import TestClient

from service.http.middleware import RequestMetricsMiddleware
from service.metrics import HttpMetrics


async def ok(request: Request) -> PlainTextResponse:
    return PlainTextResponse("ok")


def test_routes_are_labelled_by_template() -> None:
    registry = CollectorRegistry()
    routes = [Route("/health", ok), Route("/endpoints/{name}/", ok)]
    app = RequestMetricsMiddleware(
        Starlette(routes=routes), metrics=HttpMetrics(registry, "t"), routes=[r.path for r in routes]
    )
    with TestClient(app) as client:
        for path in ("/health", "/endpoints/a/", "/endpoints/b/", "/endpoints/", "/nope"):
            client.get(path)

    def count(route: str, status: str) -> float | None:
        return registry.get_sample_value("t_http_requests_total", {"route": route, "method": "GET", "status": status})

    assert count("/health", "200") == 1
    assert count("/endpoints/{name}/", "200") == 2  # two names, one label value
    assert count("other", "404") == 2  # /endpoints/ (no name) and /nope

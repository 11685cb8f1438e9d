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


def test_methods_a_client_invents_are_labelled_other() -> None:
    """Any token is a method to HTTP/1.1: labelled as sent, each made a series for good (a scanner could make
    millions)."""
    registry = CollectorRegistry()
    routes = [Route("/health", ok)]
    app = RequestMetricsMiddleware(
        Starlette(routes=routes), metrics=HttpMetrics(registry, "t"), routes=[r.path for r in routes]
    )
    with TestClient(app) as client:
        for method in ("GET", "FOO1", "FOO2", "BAR", "PATCH"):
            client.request(method, "/health")
    methods = {s.labels["method"] for m in registry.collect() for s in m.samples if s.name == "t_http_requests_total"}
    assert methods == {"GET", "PATCH", "other"}
    other = {"route": "/health", "method": "other", "status": "405"}
    assert registry.get_sample_value("t_http_requests_total", other) == 3

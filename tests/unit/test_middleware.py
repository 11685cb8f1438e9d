"""Request metrics label by route, whatever path the client sent: templates by their template, the rest 'other'."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route
from starlette.testclient import TestClient
from starlette.types import Message, Receive, Scope, Send

from service.http.body import BodyReader
from service.http.fastpath import FastJsonPost
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


async def run_asgi(app: RequestMetricsMiddleware) -> None:
    async def receive() -> Message:
        return {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        raise AssertionError(f"nothing is sent here: {message}")

    scope: Scope = {"type": "http", "path": "/x", "method": "POST", "headers": [], "query_string": b""}
    await app(scope, receive, send)


async def test_a_client_that_leaves_mid_upload_gets_a_499_counted_apart_from_our_errors() -> None:
    """Half a body, then the client left: the fast path returned without an answer, which the metrics took for an
    unhandled error (a 500, feeding the 5xx alert)."""
    registry = CollectorRegistry()
    metrics = HttpMetrics(registry, "t")

    async def never_called(*args: object) -> object:
        raise AssertionError("the body never arrived whole")

    fast = FastJsonPost(ok_app, path="/x", handler=never_called, body=BodyReader(max_bytes=1024, timeout_s=5.0),
                        errors=metrics.errors, retry_after_s=1)  # fmt: skip
    arriving: list[Message] = [{"type": "http.request", "body": b"{", "more_body": True}, {"type": "http.disconnect"}]
    sent: list[Message] = []

    async def receive() -> Message:
        return arriving.pop(0)

    async def send(message: Message) -> None:
        sent.append(message)

    scope: Scope = {"type": "http", "path": "/x", "method": "POST", "query_string": b"",
                    "headers": [(b"content-type", b"application/json"), (b"content-length", b"100")]}  # fmt: skip
    await RequestMetricsMiddleware(fast, metrics=metrics, routes=["/x"])(scope, receive, send)
    assert [m["status"] for m in sent if m["type"] == "http.response.start"] == [499]
    labels = {"route": "/x", "method": "POST"}
    assert registry.get_sample_value("t_http_requests_total", {**labels, "status": "499"}) == 1
    assert registry.get_sample_value("t_http_requests_total", {**labels, "status": "500"}) is None


async def ok_app(scope: Scope, receive: Receive, send: Send) -> None:
    raise AssertionError("not this path")


async def test_an_app_that_returns_unanswered_with_the_client_still_there_is_counted_500() -> None:
    """The server answers 500 itself then: counting 499 would hide it from the 5xx alert."""

    async def forgot_to_answer(scope: Scope, receive: Receive, send: Send) -> None:
        return None

    registry = CollectorRegistry()
    await run_asgi(RequestMetricsMiddleware(forgot_to_answer, metrics=HttpMetrics(registry, "t"), routes=["/x"]))
    labels = {"route": "/x", "method": "POST", "status": "500"}
    assert registry.get_sample_value("t_http_requests_total", labels) == 1


async def test_an_exception_that_escapes_the_app_is_counted_500() -> None:
    async def broken(scope: Scope, receive: Receive, send: Send) -> None:
        raise RuntimeError("bug")

    registry = CollectorRegistry()
    app = RequestMetricsMiddleware(broken, metrics=HttpMetrics(registry, "t"), routes=["/x"])
    with pytest.raises(RuntimeError):
        await run_asgi(app)
    labels = {"route": "/x", "method": "POST", "status": "500"}
    assert registry.get_sample_value("t_http_requests_total", labels) == 1


async def test_every_http1_answer_closes_its_connection_once_draining() -> None:
    """A keep-alive client answered 200 during a drain sent its next request on a connection the server was about to
    close, and lost it; HTTP/2 has no Connection header, and an answer that says it already is left alone."""
    draining = False

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        headers = [(b"connection", b"close")] if scope["path"] == "/closing" else []
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": b"ok"})

    middleware = RequestMetricsMiddleware(
        app, metrics=HttpMetrics(CollectorRegistry(), "t"), routes=["/a", "/closing"], draining=lambda: draining
    )

    async def headers_of(path: str, http_version: str = "1.1") -> list[tuple[bytes, bytes]]:
        sent: list[Message] = []

        async def receive() -> Message:
            return {"type": "http.request", "body": b"", "more_body": False}

        async def send(message: Message) -> None:
            sent.append(message)

        scope = {"type": "http", "method": "GET", "path": path, "http_version": http_version, "headers": []}
        await middleware(scope, receive, send)
        return list(sent[0]["headers"])

    assert await headers_of("/a") == []
    draining = True
    assert await headers_of("/a") == [(b"connection", b"close")]
    assert await headers_of("/a", "1.0") == [(b"connection", b"close")]
    assert await headers_of("/a", "2") == []
    assert await headers_of("/closing") == [(b"connection", b"close")]  # not twice

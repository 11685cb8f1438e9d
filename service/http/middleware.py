"""Pure ASGI middleware: per-request metrics, the in-flight count that graceful drain waits on, and ``Connection:
close`` on every HTTP/1 answer once draining: a keep-alive client answered 200 during the drain sent its next request
on a connection the server was about to close, and lost it (a POST is not retried); told to close, it opens a new
connection, which the balancer sends elsewhere."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Collection

from prometheus_client import Counter
from starlette.routing import compile_path
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.metrics import HttpMetrics, multiprocess

OTHER_ROUTE = "other"
# RFC 9110's methods and PATCH. A method is any token a client sends, and every new label set is a series kept for
# the process's life (and by Prometheus): the rest are labelled "other".
HTTP_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH"})
OTHER_METHOD = "other"
# A request that ended without any answer: the server answers 500 itself (the apps answer a departed client 499).
UNHANDLED_ERROR = 500
HTTP1_VERSIONS = frozenset({"1.0", "1.1"})  # HTTP/2 has no Connection header (RFC 9113 8.2.2)


class RequestMetricsMiddleware:
    """Counts requests by route template and status, times them, and tracks how many are open.

    Unknown paths and methods are labelled ``other`` so a scanner cannot blow up the label set.
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        metrics: HttpMetrics,
        routes: Collection[str],
        draining: Callable[[], bool] = lambda: False,
    ) -> None:
        self.app = app
        self.draining = draining
        self.metrics = metrics
        self.routes = frozenset(route for route in routes if "{" not in route)
        # templated routes (``/endpoints/{name}/``) are labelled by their template, never by the client's path
        self._templates = [(compile_path(route)[0], route) for route in routes if "{" in route]
        self.in_flight = 0
        # One process: read at scrape time, no gauge update per request. Several: the scrape reads the processes'
        # files, so each request moves the gauge itself.
        self._track_gauge = multiprocess()
        if not self._track_gauge:
            metrics.in_flight.set_function(lambda: self.in_flight)
        self.idle = asyncio.Event()  # set while no request is open; graceful drain waits on it
        self.idle.set()
        self._durations = {route: metrics.request_duration.labels(route=route) for route in (*routes, OTHER_ROUTE)}
        self._counters: dict[tuple[str, str, int], Counter] = {}  # label lookups cost more than the increment

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        route = path if path in self.routes else self._template_of(path)
        status = UNHANDLED_ERROR
        started = time.perf_counter()

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                if self.draining() and scope.get("http_version", "1.1") in HTTP1_VERSIONS:
                    message = _closing(message)
            await send(message)

        self.in_flight += 1
        if self._track_gauge:
            self.metrics.in_flight.inc()
        self.idle.clear()
        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            self.in_flight -= 1
            if self._track_gauge:
                self.metrics.in_flight.dec()
            if self.in_flight == 0:
                self.idle.set()
            method = scope["method"]
            key = (route, method if method in HTTP_METHODS else OTHER_METHOD, status)
            counter = self._counters.get(key)
            if counter is None:  # routes, methods and the server's own statuses: a bounded set
                counter = self._counters[key] = self.metrics.requests.labels(
                    route=route, method=key[1], status=str(status)
                )
            counter.inc()
            self._durations[route].observe(time.perf_counter() - started)

    def _template_of(self, path: str) -> str:
        for pattern, template in self._templates:
            if pattern.match(path):
                return template
        return OTHER_ROUTE


def _closing(start: Message) -> Message:
    """A response start that also says ``Connection: close`` (once: an error answer may say it already)."""
    headers = list(start.get("headers", []))
    if not any(name.lower() == b"connection" for name, _ in headers):
        headers.append((b"connection", b"close"))
    return {**start, "headers": headers}

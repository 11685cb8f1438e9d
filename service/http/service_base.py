"""What both services' app objects share: error answers for handlers and routing errors, and owned tasks."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from typing import TYPE_CHECKING, Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Match, Route
from starlette.types import ASGIApp

from service.config import BaseSettings
from service.errors import NotFound
from service.http.body import BodyReader
from service.http.fastpath import FastJsonPost, JsonHandler, Vouch
from service.http.handlers import Handler, guarded
from service.http.heap import freeze_startup_heap
from service.http.middleware import RequestMetricsMiddleware
from service.http.responses import ORJSONResponse, error_response, http_exception_to_error
from service.metrics import HttpMetrics

if TYPE_CHECKING:
    from service.http.server import Fleet

Lifespan = Callable[[Starlette], AbstractAsyncContextManager[None]]
HTTP_NOT_FOUND = 404


class ServiceBase:
    settings: BaseSettings
    metrics: HttpMetrics
    fleet: Fleet  # the processes serving this port (one unless --workers)
    _middleware: RequestMetricsMiddleware  # set by _build_asgi
    body: BodyReader  # set by _build_asgi: every handler reads its JSON body through it
    _routes: list[Route]  # set by _build_asgi: for a 404's hint

    def __init__(self) -> None:
        self._tasks: set[asyncio.Task[Any]] = set()  # kept referenced; cancelled by the lifespan
        self.exit_code = 0  # the worker process's, once served (``server.Service.exit_code``)

    def _guard(self, handler: Handler) -> Handler:
        return guarded(handler, errors=self.metrics.errors, retry_after_s=self.settings.retry_after_s)

    async def _http_exception(self, request: Request, exc: HTTPException) -> Response:
        """Starlette's own 404/405 in the service's error shape, keeping its headers (a 405's ``Allow``, which
        RFC 9110 requires)."""
        error = http_exception_to_error(exc)
        if exc.status_code == HTTP_NOT_FOUND and (twin := self._slash_twin(request)) is not None:
            error = NotFound(f"no such endpoint; did you mean {twin}?")
        self.metrics.errors.labels(code=error.code).inc()
        response = error_response(error, retry_after_s=self.settings.retry_after_s)
        if exc.headers:
            response.headers.update(exc.headers)
        return response

    def _slash_twin(self, request: Request) -> str | None:
        """The path with a trailing slash added or removed, where a route serves that."""
        path = request.url.path
        twin = path[:-1] if path.endswith("/") else path + "/"
        scope = {"type": "http", "path": twin, "root_path": "", "method": request.method}
        return twin if any(route.matches(scope)[0] is not Match.NONE for route in self._routes) else None

    @property
    def asgi(self) -> ASGIApp:
        return self._middleware

    def _build_asgi(
        self,
        routes: list[Route],
        *,
        lifespan: Lifespan,
        fast_path: str,
        fast_handler: JsonHandler,
        draining: Callable[[], bool],
        vouch: Vouch | None = None,
        max_untrusted_body_bytes: int | None = None,
    ) -> None:
        """Starlette for every route, the one hot JSON POST path served ahead of it on raw ASGI
        (``fastpath.py``, with its ``vouch``), and the request metrics (and in-flight count that drain waits on)
        around both: ``self._middleware``, which ``asgi`` serves. ``max_untrusted_body_bytes``: the body budget's
        share for untrusted reads (None: ``BodyReader``'s default). ``draining``: whether the service stopped admitting
        work, when every answer closes its connection."""
        app = Starlette(
            routes=routes,
            exception_handlers={HTTPException: self._http_exception},  # type: ignore[dict-item]
            lifespan=lifespan,
        )
        # A path with a slash too many or too few is a 404 like any unknown path, not a 307 to where the client's Host
        # header and plain http point: behind a TLS load balancer that resent the body in the clear.
        app.router.redirect_slashes = False
        self._routes = routes
        self.body = BodyReader(
            max_bytes=self.settings.max_body_bytes,
            timeout_s=self.settings.body_timeout_s,
            max_buffered_bytes=self.settings.max_buffered_body_bytes or None,
            max_untrusted_bytes=max_untrusted_body_bytes,
        )
        fast = FastJsonPost(
            app,
            path=fast_path,
            handler=fast_handler,
            body=self.body,
            errors=self.metrics.errors,
            retry_after_s=self.settings.retry_after_s,
            vouch=vouch,
        )
        self._middleware = RequestMetricsMiddleware(
            fast, metrics=self.metrics, routes=[route.path for route in routes], draining=draining
        )

    def _become_ready(self) -> None:
        """Everything the process keeps for its lifetime is loaded: freeze it out of the garbage collector's sight
        (``heap.py``), then say ready (this process's share of the fleet, and the ready gauge)."""
        freeze_startup_heap()
        self.fleet.mark_ready()
        self.metrics.ready.set(1)

    def alive(self) -> bool:
        """False only when restarting the process is the remedy; loading and draining are alive."""
        return True

    async def livez(self, request: Request) -> Response:
        """Liveness, kept apart from readiness (/health): a draining or loading process must not be
        restarted, only taken out of the load balancer."""
        alive = self.alive()
        return ORJSONResponse({"status": "alive" if alive else "failed"}, status_code=200 if alive else 503)

    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

"""Thin HTTP handlers for the router. All logic lives in the engine; these only translate."""

from __future__ import annotations

import asyncio
import hmac
from collections.abc import Awaitable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Receive

from service.errors import InvalidRequest, NotReady, ShuttingDown, Unauthorized
from service.http.fastpath import ClientGone, Headers
from service.http.responses import ORJSONResponse, parse_json_object
from service.metrics import PROMETHEUS_CONTENT_TYPE
from service.router.schemas import RouteDecision, models_listing, parse_route_request
from service.router.weights import WeightsError

if TYPE_CHECKING:
    from service.router.app import RouterService

T = TypeVar("T")


class RouterApi:
    def __init__(self, service: RouterService) -> None:
        self.service = service

    async def route(
        self, body: bytes, headers: Headers, query_string: bytes, receive: Receive, credential: None
    ) -> dict[str, Any]:
        """``POST /v1/route``, served on the fast path (``service.http.fastpath``): returns the JSON answer.
        A supplied embedding or a cached prompt is answered at once; a prompt to embed waits for its batch,
        watching for the client going away (its prompt is then dropped before compute). ``credential``: always
        None, as the route takes none (no vouch)."""
        service = self.service
        if service.draining:
            raise ShuttingDown("the router is draining; send new requests elsewhere")
        engine = service.engine
        if engine is None:
            raise NotReady(service.not_ready_reason())
        route_request = parse_route_request(body, max_prompt_chars=service.settings.max_prompt_chars, dim=engine.dim)
        outcome = engine.route_or_queue(route_request)
        if not isinstance(outcome, RouteDecision):
            outcome = await _unless_disconnected(receive, outcome)
        return outcome.to_json()

    async def models(self, request: Request) -> Response:
        """``GET /v1/models``: the serving weights' models; 503 until the router serves (the weights are
        installed before the warm-up, which may still fail)."""
        state = self.service.holder.current()
        if self.service.engine is None or state is None:
            raise NotReady(self.service.not_ready_reason())
        return ORJSONResponse(models_listing(state.weights))

    async def health(self, request: Request) -> Response:
        body = self.service.health()
        return ORJSONResponse(body, status_code=200 if body["status"] == "ok" else 503)

    async def metrics(self, request: Request) -> Response:
        return Response(self.service.metrics.render(), media_type=PROMETHEUS_CONTENT_TYPE)

    async def openapi(self, request: Request) -> Response:
        from service.router.openapi import router_openapi

        settings = self.service.settings
        return ORJSONResponse(router_openapi(settings.max_prompt_chars, admin_token=settings.admin_token is not None))

    async def reload(self, request: Request) -> Response:
        """POST /admin/reload {"path": optional}: validate, swap atomically, clear the cache."""
        service = self.service
        _check_admin(request, service.settings.admin_token)
        if service.engine is None:
            raise NotReady(service.not_ready_reason())
        body = await service.body.read_request(request)
        path = _reload_path(body) or service.settings.resolved_weights()
        try:
            weights = await service.reload_weights(path)
        except WeightsError as exc:
            raise InvalidRequest(f"weights rejected, still serving the previous ones: {exc}") from None
        return ORJSONResponse(
            {
                "status": "reloaded",
                "weights_version": weights.version,
                "path": str(path),
                "models": weights.num_models,
                "clusters": weights.num_clusters,
                "workers": service.fleet.size,
            }
        )


def _reload_path(body: bytes) -> Path | None:
    if not body.strip():
        return None
    path = parse_json_object(body).get("path")
    if path is None:
        return None
    if not isinstance(path, str) or not path:
        raise InvalidRequest("'path' must be a non-empty string")
    return Path(path)


def _check_admin(request: Request, token: str | None) -> None:
    if token is None:
        return
    header = request.headers.get("authorization", "")
    scheme, _, given = header.partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(given.encode(), token.encode()):
        raise Unauthorized("admin endpoints need 'Authorization: Bearer <admin token>'")


async def _unless_disconnected(receive: Receive, work: Awaitable[T]) -> T:
    """Await ``work``; if the client disconnects first, cancel it (its prompt is then dropped
    before compute) and raise ``ClientGone``."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_disconnected(receive))
    try:
        await asyncio.wait((task, watcher), return_when=asyncio.FIRST_COMPLETED)
    except BaseException:
        task.cancel()
        raise
    finally:
        watcher.cancel()
    if task.done():
        return task.result()
    task.cancel()
    raise ClientGone


async def _disconnected(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass

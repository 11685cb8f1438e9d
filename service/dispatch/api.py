"""Thin HTTP handlers for the dispatcher: parse, authenticate, one store call, sign, answer."""

from __future__ import annotations

import hmac
import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs

from prometheus_client import Counter
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Receive

from service.dispatch import schemas
from service.dispatch.endpoints import EndpointSpec, hash_key
from service.dispatch.ids import new_request_id
from service.dispatch.records import Assigned, PickPolicy
from service.dispatch.signing import ALGORITHM
from service.dispatch.store import UnknownRequest
from service.errors import InvalidRequest, NotFound, ShuttingDown, TooManyOpenRequests, Unauthorized
from service.http.fastpath import Headers
from service.http.responses import ORJSONResponse, parse_json_object
from service.metrics import PROMETHEUS_CONTENT_TYPE

if TYPE_CHECKING:
    from service.dispatch.app import DispatcherService

MS_PER_S = 1000

logger = logging.getLogger(__name__)

BAD_CLIENT_KEY = "invalid api key for this endpoint"  # one message whether or not the endpoint exists
BAD_WORKER_TOKEN = "invalid worker token for this endpoint"


@dataclass(frozen=True, slots=True)
class KnownKey:
    """A client key from the Authorization header or the query string that is some endpoint's, with its digest:
    ``route`` authenticates with that digest rather than hashing the key again."""

    key: str
    digest: str


class DispatcherApi:
    def __init__(self, service: DispatcherService) -> None:
        self.service = service
        self.settings = service.settings
        self.metrics = service.metrics
        self._outcomes: dict[tuple[str, str], Counter] = {}

    def vouch(self, headers: Headers, query_string: bytes) -> KnownKey | None:
        """Before ``/route/``'s body is read: the key of its Bearer header, else of its ``api_key`` query parameter
        (``parse_route_request``'s order), if it is a client key of some endpoint. Such a body is read against the
        budget of keyed clients, any other (no such key, an unknown one, a key only in the body) against the smaller
        untrusted one: bodies stalled by anyone could otherwise starve keyed clients of the whole budget. Which
        endpoint the key opens is only known from the body; ``route`` checks that as ever."""
        authorization = headers.get(b"authorization")
        key = schemas.bearer_token(authorization.decode("latin-1")) if authorization else None
        if key is None:
            key = _query_param(query_string, "api_key")
        if not key:
            return None
        digest = hash_key(key)
        return KnownKey(key, digest) if self.service.registry.known_client_digest(digest) else None

    async def route(
        self, body: bytes, headers: Headers, query_string: bytes, receive: Receive, known: KnownKey | None
    ) -> dict[str, Any]:
        """``POST /route/``, served on the fast path (``service.http.fastpath``): returns the JSON answer. Nothing
        here waits long enough to watch ``receive`` for a departed client. ``known``: what ``vouch`` found."""
        service, settings = self.service, self.settings
        if service.draining:
            raise ShuttingDown("the dispatcher is draining; send new requests elsewhere")
        authorization = headers.get(b"authorization")
        idempotency_key = headers.get(b"idempotency-key")
        route_request = schemas.parse_route_request(
            parse_json_object(body),
            authorization=authorization.decode("latin-1") if authorization else None,
            query_api_key=_query_param(query_string, "api_key"),
            max_cost=settings.max_cost,
            idempotency_key=idempotency_key.decode("latin-1") if idempotency_key is not None else None,
        )
        # the body's key, when it has one, beats the header's: the digest is reused only for that same key
        digest = known.digest if known is not None and known.key == route_request.api_key else None
        spec = service.registry.authenticate_client(route_request.endpoint, route_request.api_key, digest)
        if spec is None:
            raise Unauthorized(BAD_CLIENT_KEY)
        started = time.perf_counter()
        try:
            outcome = await service.store.route(
                spec.name,
                route_request.cost,
                route_request.request_idx,
                self._policy(spec),
                route_request.idempotency_key,
            )
        except UnknownRequest:
            self._count(spec.name, "unknown_request")
            raise InvalidRequest(
                f"unknown request_idx {route_request.request_idx} for endpoint {spec.name!r} "
                "(never issued here, or expired); send request_idx 0 for a new request",
                details={"reason": schemas.UNKNOWN_REQUEST_IDX},
            ) from None
        except TooManyOpenRequests:
            self._count(spec.name, "too_many_open_requests")
            raise
        finally:
            self.metrics.pick_duration.observe(time.perf_counter() - started)
        request_id = new_request_id()
        if not isinstance(outcome, Assigned):
            self._count(spec.name, "no_ready_worker")
            return schemas.no_ready_answer(spec.name, outcome, request_id)
        signer = service.signer
        assignment = schemas.assignment_for(
            spec.name,
            outcome,
            route_request.cost,
            expires_at_ms=int((time.time() + settings.assignment_ttl_s) * MS_PER_S),
            key_id=signer.key_id,
        )
        outcome_label = "reassigned" if outcome.retry else "assigned"
        self._count(spec.name, outcome_label)
        return schemas.assigned_answer(assignment, await service.signing.sign(assignment), request_id)

    async def pubkey(self, request: Request) -> Response:
        keys = self.service.published_keys
        current = keys[0]
        return ORJSONResponse(
            {
                "algorithm": ALGORITHM,
                "key_id": current.key_id,
                "public_key": current.public_key_hex,
                "keys": [key.to_json() for key in keys],
            }
        )

    async def worker_status(self, request: Request) -> Response:
        token, digest = _worker_token(request)
        data = await self._read_worker_body(request, digest)
        name, report = schemas.parse_worker_report(data, max_value=self.settings.max_report_value)
        spec = self._authenticate_worker(name, token, digest)
        record = await self.service.store.report(spec.name, report, self.settings.heartbeat_timeout_s)
        self.metrics.reports.labels(endpoint=spec.name).inc()
        if record.given_back:
            self.metrics.given_back.labels(endpoint=spec.name).inc(record.given_back)
            logger.info(
                "worker %r of endpoint %s restarted: %d request(s) it held gave their load back",
                record.worker_id, spec.name, record.given_back,
            )  # fmt: skip
        return ORJSONResponse(
            {
                "ok": True,
                "endpoint": spec.name,
                "id": record.worker_id,
                "reqnum": record.reqnum,
                "load": record.load,
                "heartbeat_timeout_s": self.settings.heartbeat_timeout_s,
            }
        )

    async def delete_requests(self, request: Request) -> Response:
        token, digest = _worker_token(request)
        data = await self._read_worker_body(request, digest)
        name, idxs, success, worker_id = schemas.parse_release(data)
        spec = self._authenticate_worker(name, token, digest)
        released = await self.service.store.release(spec.name, idxs, worker_id, self.settings.released_retry_s)
        self.metrics.released.labels(endpoint=spec.name, success=str(success).lower()).inc(released.released)
        return ORJSONResponse(
            {"ok": True, "released": released.released, "unknown": released.unknown, "not_held": released.not_held}
        )

    async def endpoint_info(self, request: Request) -> Response:
        """Operator view of one endpoint: settings, workers and the autoscaling decision."""
        name = request.path_params["name"]
        spec = self._authenticate_operator(request, name)
        view = await self.service.endpoint_view(spec)
        timeout = self.settings.heartbeat_timeout_s
        return ORJSONResponse(
            {
                "endpoint": spec.name,
                "settings": {
                    "max_queue_time_s": spec.max_queue_time_s,
                    "target_util": spec.target_util,
                    "min_workers": spec.min_workers,
                    "max_workers": spec.max_workers,
                    "cold_workers": spec.cold_workers,
                },
                "workers": [schemas.worker_json(w, now=view.now, heartbeat_timeout_s=timeout) for w in view.workers],
                "autoscale": view.decision.to_json(),
            }
        )

    async def health(self, request: Request) -> Response:
        body = await self.service.health()
        return ORJSONResponse(body, status_code=503 if body["status"] == "draining" else 200)

    async def metrics_text(self, request: Request) -> Response:
        return Response(self.metrics.render(), media_type=PROMETHEUS_CONTENT_TYPE)

    async def openapi(self, request: Request) -> Response:
        from service.dispatch.openapi import dispatcher_openapi

        settings = self.settings
        return ORJSONResponse(
            dispatcher_openapi(
                max_cost=settings.max_cost,
                max_report_value=settings.max_report_value,
                admin_token=settings.admin_token is not None,
            )
        )

    # -- helpers ------------------------------------------------------------------------------------------------
    def _count(self, endpoint: str, outcome: str) -> None:
        key = (endpoint, outcome)
        counter = self._outcomes.get(key)
        if counter is None:  # endpoints are configured names and outcomes a fixed set: the cache is bounded
            counter = self._outcomes[key] = self.metrics.routes.labels(endpoint=endpoint, outcome=outcome)
        counter.inc()

    def _policy(self, spec: EndpointSpec) -> PickPolicy:
        return PickPolicy(
            max_queue_time_s=spec.max_queue_time_s,
            heartbeat_timeout_s=self.settings.heartbeat_timeout_s,
            request_ttl_s=self.settings.request_ttl_s,
        )

    async def _read_worker_body(self, request: Request, digest: str) -> dict[str, Any]:
        """A worker call's body, read against the keyed clients' budget only with a token that is some endpoint's
        (as ``vouch`` does for ``/route/``)."""
        trusted = self.service.registry.known_worker_digest(digest)
        return parse_json_object(await self.service.body.read_request(request, trusted=trusted))

    def _authenticate_worker(self, name: str, token: str, digest: str) -> EndpointSpec:
        spec = self.service.registry.authenticate_worker(name, token, digest)
        if spec is None:
            raise Unauthorized(BAD_WORKER_TOKEN)
        return spec

    def _authenticate_operator(self, request: Request, name: str) -> EndpointSpec:
        token = schemas.bearer_token(request.headers.get("authorization")) or ""
        registry = self.service.registry
        admin = self.settings.admin_token
        if admin is not None and hmac.compare_digest(token.encode(), admin.encode()):
            spec = registry.get(name)
            if spec is None:
                raise NotFound(f"no endpoint named {name!r}")
            return spec
        spec = registry.authenticate_client(name, token)
        if spec is None:
            raise Unauthorized(BAD_CLIENT_KEY)
        return spec


def _worker_token(request: Request) -> tuple[str, str]:
    """The worker token and its digest; a request without one is a 401 before its body is read or judged (which
    endpoint a token belongs to is only known from the body, so a wrong token is refused after parsing)."""
    token = schemas.bearer_token(request.headers.get("authorization"))
    if token is None:
        raise Unauthorized(BAD_WORKER_TOKEN)
    return token, hash_key(token)


def _query_param(query_string: bytes, name: str) -> str | None:
    if not query_string:
        return None
    values = parse_qs(query_string.decode("latin-1")).get(name)
    return values[-1] if values else None

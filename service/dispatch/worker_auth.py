"""Refuse work that the dispatcher did not assign to this worker, before any handler runs.

Clients send ``POST {url}{route}`` with ``{"auth_data": <the route answer>, "payload": {...}}``. This pure-ASGI
middleware reads that body once, verifies ``auth_data`` (``AssignmentVerifier``) and either answers itself
(``invalid_assignment`` with the ``reason``: 401, or 503 with Retry-After where routing the request again mends it;
400, 413, 415 for a body that is not a JSON object, too large, or not JSON at all: the service's own body reader
and error answers) or hands the request on with the body replayed
unchanged and the verified ``Assignment`` in ``request.state.assignment`` (the payload in ``request.state.payload``,
its numbers exact). Being plain ASGI it wraps any framework, and it never buffers the bodies of paths it does not
protect. Whatever else Vast's SDK sends (``session_id``, ``?api_key=``, a Bearer header) is
left alone: the signature is the only credential a worker needs.

``verify_request_body`` does the same check for servers that are not ASGI.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Awaitable, Callable, Collection, Mapping
from typing import Any

from starlette.requests import ClientDisconnect
from starlette.routing import get_route_path
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.dispatch.signing import Assignment
from service.dispatch.verifier import AssignmentRejected, AssignmentVerifier, RejectReason, normalise_url
from service.errors import InvalidRequest, ServiceError
from service.http.body import BodyReader
from service.http.responses import error_response, parse_exact_json_object, parse_json_object

DEFAULT_MAX_BODY_BYTES = 16 * 1024 * 1024
DEFAULT_BODY_TIMEOUT_S = 60.0  # a stalled upload must not hold the worker's connection for ever
# bodies read at once, before any is verified: 100 stalled unsigned 16 MiB bodies held 1.7 GB of a worker
DEFAULT_MAX_BUFFERED_BYTES = 256 * 1024 * 1024
STATE_ASSIGNMENT = "assignment"
STATE_PAYLOAD = "payload"
RETRY_AFTER_S = 1  # error_response needs one; none of the errors raised here carries Retry-After
# methods that do no work: the only ones let through unchecked when no path list is given
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


def verify_request_body(verifier: AssignmentVerifier, body: bytes) -> tuple[Assignment, object]:
    """The verified assignment and the ``payload`` of a worker request body.

    Raises ``InvalidRequest`` when the body is not a JSON object, ``AssignmentRejected`` when ``auth_data`` is
    missing or does not verify. The reqnum is used up only once the payload has parsed too."""
    data, exact = _fast_parse(body), None
    if data is None:
        data = exact = parse_exact_json_object(body)
    assignment = verifier.authenticate(auth_data_of(data))
    payload = _payload(body, exact)
    return verifier.use(assignment), payload


def auth_data_of(data: Mapping[str, Any]) -> Mapping[str, Any]:
    auth_data = data.get("auth_data")
    if not isinstance(auth_data, Mapping):
        raise AssignmentRejected(RejectReason.BAD_FORMAT, "body has no auth_data object")
    return auth_data


# orjson's refusals of what JSON allows (an integer past a double, a lone surrogate escape): those bodies take the
# exact parser; anything else orjson refuses is not JSON
_JSON_ORJSON_REFUSES = re.compile(r"infinity when parsed as double|surrogate")


async def parse_body(body: bytes, exact_parses: asyncio.Semaphore) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """The body for ``auth_data`` and, when it took the exact parser already, for the payload. orjson first: the
    exact parser holds the event loop about 0.25 s per MiB of numbers, and anyone may send 16 MiB, so only a verified
    request pays for it. The signed fields read the same either way (integers within 64 bits, correctly rounded
    floats). A body orjson refuses but JSON allows is parsed exactly in a thread, one at a time (``exact_parses``):
    it holds the GIL, so a thread spares the loop only its turns."""
    fast = _fast_parse(body)
    if fast is not None:
        return fast, None
    async with exact_parses:
        exact = await asyncio.to_thread(parse_exact_json_object, body)
    return exact, exact


def _fast_parse(body: bytes) -> dict[str, Any] | None:
    """The body parsed by orjson; None when orjson refused what JSON allows (the exact parser's to read)."""
    try:
        return parse_json_object(body)
    except InvalidRequest as exc:
        if _JSON_ORJSON_REFUSES.search(exc.message):
            return None
        raise


def _payload(body: bytes, exact: dict[str, Any] | None) -> object:
    """The ``payload`` with every number exact: from the exact parse already made, else one now."""
    return (exact if exact is not None else parse_exact_json_object(body)).get("payload")


class AssignmentAuthMiddleware:
    """Verifies ``auth_data`` on every request to ``protected_paths``, whatever its method (when None: on every
    request but GET, HEAD and OPTIONS).

    On ``unknown_key`` it awaits ``refresh_keys`` (True when the verifier got the keys the dispatcher publishes now)
    and verifies once more before answering 401: the dispatcher signs with a new key as soon as it rotates, and a
    client such as Vast's SDK does not retry a refused request.
    Paths match with or without trailing slashes, so ``/echo/`` cannot slip past a check on ``/echo``; the app is
    handed the path so matched, since a redirect to it (Starlette's, for a trailing slash) would lose a request
    whose reqnum is already used. List the paths exactly as routed all the same. Paths are matched as the router
    matches them, below the app's ``root_path``: a worker app mounted under a prefix, or served with a root path,
    is checked on the same routes."""

    def __init__(
        self,
        app: ASGIApp,
        verifier: AssignmentVerifier,
        protected_paths: Collection[str] | None = None,
        *,
        max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
        body_timeout_s: float = DEFAULT_BODY_TIMEOUT_S,
        max_buffered_bytes: int = DEFAULT_MAX_BUFFERED_BYTES,
        refresh_keys: Callable[[], Awaitable[bool]] | None = None,
    ) -> None:
        self.app = app
        self._refresh_keys = refresh_keys
        self.verifier = verifier
        self._paths = None if protected_paths is None else frozenset(normalise_url(p) for p in protected_paths)
        if max_buffered_bytes < max_body_bytes:
            raise ValueError("max_buffered_bytes must be at least max_body_bytes (a largest body would never fit)")
        self._exact_parses = asyncio.Semaphore(1)  # of bodies orjson refused, before any is verified
        self._body = BodyReader(
            max_bytes=max_body_bytes, timeout_s=body_timeout_s, max_buffered_bytes=max_buffered_bytes
        )

    def protects(self, scope: Scope) -> bool:
        if scope["type"] != "http":
            return False
        if self._paths is None:
            return scope["method"] not in SAFE_METHODS
        return normalise_url(get_route_path(scope)) in self._paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if not self.protects(scope):
            await self.app(scope, receive, send)
            return
        try:
            body = await self._body.read(dict(scope["headers"]), receive)
            assignment, payload = await self._verify(body)
        except ClientDisconnect:
            return  # nobody to answer
        except ServiceError as exc:
            await error_response(exc, retry_after_s=RETRY_AFTER_S)(scope, receive, send)
            return
        state = {**scope.get("state", {}), STATE_ASSIGNMENT: assignment, STATE_PAYLOAD: payload}
        route_path = get_route_path(scope)
        prefix = scope["path"][: len(scope["path"]) - len(route_path)]  # the root_path, as the path carries it
        routed = {**scope, "path": prefix + (normalise_url(route_path) or "/"), "state": state}
        await self.app(routed, _replay(body, receive), send)

    async def _verify(self, body: bytes) -> tuple[Assignment, object]:
        data, exact = await parse_body(body, self._exact_parses)
        auth_data = auth_data_of(data)
        try:
            assignment = self.verifier.authenticate(auth_data)
        except AssignmentRejected as exc:
            if exc.reason is not RejectReason.UNKNOWN_KEY or self._refresh_keys is None:
                raise
            if not await self._refresh_keys():
                raise
            assignment = self.verifier.authenticate(auth_data)  # with the keys just fetched
        # its reqnum is used up only once the payload parsed: one refused as 400 can be sent again, fixed
        return self.verifier.use(assignment), _payload(body, exact)


def _replay(body: bytes, receive: Receive) -> Receive:
    """A ``receive`` that yields the body already read once, then defers to the server (disconnects)."""
    sent = False

    async def replayed() -> Message:
        nonlocal sent
        if sent:
            return await receive()
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    return replayed

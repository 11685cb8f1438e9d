"""Refuse work that the dispatcher did not assign to this worker, before any handler runs.

Clients send ``POST {url}{route}`` with ``{"auth_data": <the route answer>, "payload": {...}}``. This pure-ASGI
middleware reads that body once, verifies ``auth_data`` (``AssignmentVerifier``) and either answers itself
(401 ``invalid_assignment``, 400 for a body that is not a JSON object, 413 for an oversized one) or hands the
request on with the body replayed unchanged and the verified ``Assignment`` in ``request.state.assignment`` (the
payload in ``request.state.payload``). Being plain ASGI it wraps any framework, and it never buffers the bodies
of paths it does not protect. Whatever else Vast's SDK sends (``session_id``, ``?api_key=``, a Bearer header) is
left alone: the signature is the only credential a worker needs.

``verify_request_body`` does the same check for servers that are not ASGI.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping

import orjson
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.dispatch.signing import Assignment
from service.dispatch.verifier import AssignmentRejected, AssignmentVerifier, RejectReason, normalise_url

DEFAULT_MAX_BODY_BYTES = 16 * 1024 * 1024
STATE_ASSIGNMENT = "assignment"
STATE_PAYLOAD = "payload"
INVALID_ASSIGNMENT = "invalid_assignment"
INVALID_REQUEST = "invalid_request"
PAYLOAD_TOO_LARGE = "payload_too_large"
HTTP_BAD_REQUEST = 400
HTTP_UNAUTHORIZED = 401
HTTP_PAYLOAD_TOO_LARGE = 413
JSON_HEADERS = [(b"content-type", b"application/json")]


class InvalidBody(ValueError):
    """The request body is not a JSON object."""


class BodyTooLarge(ValueError):
    """The request body is over the middleware's limit."""


def verify_request_body(verifier: AssignmentVerifier, body: bytes) -> tuple[Assignment, object]:
    """The verified assignment and the ``payload`` of a worker request body.

    Raises ``InvalidBody`` when the body is not a JSON object, ``AssignmentRejected`` when ``auth_data`` is
    missing or does not verify."""
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise InvalidBody(f"body is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise InvalidBody("body must be a JSON object")
    auth_data = data.get("auth_data")
    if not isinstance(auth_data, Mapping):
        raise AssignmentRejected(RejectReason.BAD_FORMAT, "body has no auth_data object")
    return verifier.verify(auth_data), data.get("payload")


class AssignmentAuthMiddleware:
    """Verifies ``auth_data`` on POSTs to ``protected_paths`` (every POST when None).

    ``on_reject`` sees every rejection before the 401 goes out (a worker refreshes its keys on ``unknown_key``).
    Paths match with or without a trailing slash, so ``/echo/`` cannot slip past a check on ``/echo``. List the
    paths exactly as routed all the same: a request the app then redirects has already used its reqnum."""

    def __init__(
        self,
        app: ASGIApp,
        verifier: AssignmentVerifier,
        protected_paths: Collection[str] | None = None,
        *,
        max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
        on_reject: Callable[[AssignmentRejected], None] | None = None,
    ) -> None:
        self.app = app
        self._on_reject = on_reject
        self.verifier = verifier
        self._paths = None if protected_paths is None else frozenset(normalise_url(p) for p in protected_paths)
        self._max_body_bytes = max_body_bytes

    def protects(self, scope: Scope) -> bool:
        if scope["type"] != "http" or scope["method"] != "POST":
            return False
        return self._paths is None or normalise_url(scope["path"]) in self._paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if not self.protects(scope):
            await self.app(scope, receive, send)
            return
        try:
            body = await _read_body(receive, self._max_body_bytes)
            assignment, payload = verify_request_body(self.verifier, body)
        except BodyTooLarge as exc:
            await _send_error(send, HTTP_PAYLOAD_TOO_LARGE, PAYLOAD_TOO_LARGE, str(exc))
            return
        except InvalidBody as exc:
            await _send_error(send, HTTP_BAD_REQUEST, INVALID_REQUEST, str(exc))
            return
        except AssignmentRejected as exc:
            if self._on_reject is not None:
                self._on_reject(exc)
            await _send_error(send, HTTP_UNAUTHORIZED, INVALID_ASSIGNMENT, str(exc), reason=exc.reason.value)
            return
        state = {**scope.get("state", {}), STATE_ASSIGNMENT: assignment, STATE_PAYLOAD: payload}
        await self.app({**scope, "state": state}, _replay(body, receive), send)


async def _read_body(receive: Receive, max_bytes: int) -> bytes:
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise InvalidBody("client disconnected before sending the whole body")
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > max_bytes:
            raise BodyTooLarge(f"body is over the {max_bytes}-byte limit")
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


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


async def _send_error(send: Send, status: int, code: str, message: str, *, reason: str | None = None) -> None:
    error = {"code": code, "message": message}
    if reason is not None:
        error["reason"] = reason
    body = orjson.dumps({"error": error})
    headers = [*JSON_HEADERS, (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})

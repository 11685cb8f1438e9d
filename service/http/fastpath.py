"""A JSON POST endpoint served straight on ASGI, for the hot paths (the router's ``/v1/route``, the dispatcher's
``/route/``).

Starlette's router, exception middlewares, ``Request`` and ``Response`` objects cost about as much per call as
the routing work itself; this path skips them and keeps the same contract: 415 for a non-JSON content type, 413
past ``max_body_bytes`` and 408 past ``body_timeout_s`` (``body.BodyReader``), the one error body for every
``ServiceError`` (``error_response``: errors are not the hot path), a logged 500 for anything else. A client that
leaves mid-upload, or while a handler that watches ``receive`` waits (it raises ``ClientGone``), gets a bodiless 499
(nginx's "client closed request"), which the request metrics count apart from the server's own 5xx. Hypercorn
reports a half-closed connection (``shutdown(SHUT_WR)`` after the request) as a disconnect too, and so does this
path, as nginx does: such a client, if it still reads, gets the 499. Every other path falls through to the wrapped
app.

A path whose requests may carry a credential outside the body can give a ``vouch``: called with the headers and the
query string before the body is read, it returns the credential it found good (passed on to the handler, which may
reuse what checking it cost) or None, and the body is read trusted only with one (``BodyReader``'s split budget).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import orjson
from prometheus_client import Counter
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from service.errors import ServiceError
from service.http.body import BodyReader
from service.http.responses import CLIENT_CLOSED_REQUEST, error_response

logger = logging.getLogger(__name__)

Headers = Mapping[bytes, bytes]
# (body, headers, query string, receive, what the vouch returned: None without one) -> the JSON answer
JsonHandler = Callable[[bytes, Headers, bytes, Receive, Any], Awaitable[Any]]
# (headers, query string) -> a credential known good before the body is read, or None
Vouch = Callable[[Headers, bytes], Any]

_JSON_HEADERS = [(b"content-type", b"application/json")]


class ClientGone(Exception):
    """The client disconnected while its request waited."""


class FastJsonPost:
    def __init__(
        self,
        app: ASGIApp,
        *,
        path: str,
        handler: JsonHandler,
        body: BodyReader,
        errors: Counter,
        retry_after_s: int,
        vouch: Vouch | None = None,
    ) -> None:
        self.app = app
        self.vouch = vouch
        self.path = path
        self.handler = handler
        self.body = body
        self.errors = errors
        self.retry_after_s = retry_after_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] != self.path or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])  # ASGI lower-cases names; duplicates: the last wins
        query_string = scope["query_string"]
        try:
            if self.vouch is None:
                credential = None
                body = await self.body.read(headers, receive)
            else:
                credential = self.vouch(headers, query_string)
                body = await self.body.read(headers, receive, trusted=credential is not None)
            answer = await self.handler(body, headers, query_string, receive, credential)
        except (ClientDisconnect, ClientGone):
            await send({"type": "http.response.start", "status": CLIENT_CLOSED_REQUEST, "headers": []})
            await send({"type": "http.response.body", "body": b""})
            return
        except ServiceError as exc:
            await self._send_error(scope, receive, send, exc)
            return
        except Exception:
            logger.exception("unhandled error in %s", self.path)
            await self._send_error(scope, receive, send, ServiceError("internal error"))
            return
        payload = orjson.dumps(answer)
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [*_JSON_HEADERS, (b"content-length", str(len(payload)).encode())],
            }
        )
        await send({"type": "http.response.body", "body": payload})

    async def _send_error(self, scope: Scope, receive: Receive, send: Send, exc: ServiceError) -> None:
        self.errors.labels(code=exc.code).inc()
        await error_response(exc, retry_after_s=self.retry_after_s)(scope, receive, send)


async def served_by_fast_path(request: Request) -> Response:  # pragma: no cover - FastJsonPost answers first
    """The Starlette route behind a fast path: it keeps the path known to the router (405 for other methods)."""
    raise AssertionError(f"POST {request.url.path} is served by FastJsonPost")

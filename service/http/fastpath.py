"""A JSON POST endpoint served straight on ASGI, for the one hot path (the dispatcher's ``/route/``).

Starlette's router, exception middlewares, ``Request`` and ``Response`` objects cost about as much per call as
the routing work itself; this path skips them and keeps the same contract: 415 for a non-JSON content type,
413 past ``max_body_bytes``, the one error body for every ``ServiceError``, a logged 500 for anything else.
Every other path falls through to the wrapped app.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import orjson
from prometheus_client import Counter
from starlette.types import ASGIApp, Receive, Scope, Send

from service.errors import PayloadTooLarge, ServiceError, UnsupportedMediaType

logger = logging.getLogger(__name__)

Headers = Mapping[bytes, bytes]
JsonHandler = Callable[[bytes, Headers, bytes], Awaitable[Any]]  # (body, headers, query string) -> JSON value

_JSON_HEADERS = [(b"content-type", b"application/json")]


class FastJsonPost:
    def __init__(
        self,
        app: ASGIApp,
        *,
        path: str,
        handler: JsonHandler,
        max_body_bytes: int,
        errors: Counter,
        retry_after_s: int,
    ) -> None:
        self.app = app
        self.path = path
        self.handler = handler
        self.max_body_bytes = max_body_bytes
        self.errors = errors
        self.retry_after = str(retry_after_s).encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] != self.path or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])  # ASGI lower-cases names; duplicates: the last wins
        try:
            body = await self._read_body(headers, receive)
            answer = await self.handler(body, headers, scope["query_string"])
        except ServiceError as exc:
            await self._send_error(send, exc)
            return
        except Exception:
            logger.exception("unhandled error in %s", self.path)
            await self._send_error(send, ServiceError("internal error"))
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

    async def _read_body(self, headers: Headers, receive: Receive) -> bytes:
        content_type = headers.get(b"content-type", b"application/json").split(b";")[0].strip().lower()
        if content_type != b"application/json" and not content_type.endswith(b"+json"):
            raise UnsupportedMediaType(f"content type must be application/json, got {content_type.decode()!r}")
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_body_bytes:
            raise PayloadTooLarge(f"body of {declared.decode()} bytes is over the {self.max_body_bytes}-byte limit")
        body = b""
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client went away
                return body
            body += message.get("body", b"")
            if len(body) > self.max_body_bytes:
                raise PayloadTooLarge(f"body is over the {self.max_body_bytes}-byte limit")
            if not message.get("more_body", False):
                return body

    async def _send_error(self, send: Send, exc: ServiceError) -> None:
        self.errors.labels(code=exc.code).inc()
        payload = orjson.dumps({"error": {"code": exc.code, "message": exc.message}})
        headers = [*_JSON_HEADERS, (b"content-length", str(len(payload)).encode())]
        if exc.retry_after:
            headers.append((b"retry-after", self.retry_after))
        await send({"type": "http.response.start", "status": exc.status, "headers": headers})
        await send({"type": "http.response.body", "body": payload})

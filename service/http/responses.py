"""JSON in and out (orjson): request bodies, responses, and the one error body
``{"error": {"code": ..., "message": ...}}``."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any, NoReturn

import orjson
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.types import Receive

from service.errors import (
    InvalidRequest,
    MethodNotAllowed,
    NotFound,
    PayloadTooLarge,
    ServiceError,
    UnsupportedMediaType,
)


class ORJSONResponse(JSONResponse):
    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content, option=orjson.OPT_SERIALIZE_NUMPY)


NOT_AN_OBJECT = "body must be a JSON object"


def error_response(error: ServiceError, *, retry_after_s: int) -> Response:
    headers = {"Retry-After": str(retry_after_s)} if error.retry_after else {}
    if error.close_connection:
        headers["Connection"] = "close"
    body = {"code": error.code, "message": error.message, **error.details}
    return ORJSONResponse({"error": body}, status_code=error.status, headers=headers)


def http_exception_to_error(exc: HTTPException) -> ServiceError:
    """Starlette's own 404/405 (unknown route, wrong method) in our error shape."""
    if exc.status_code == 404:
        return NotFound("no such endpoint")
    if exc.status_code == 405:
        return MethodNotAllowed("method not allowed on this endpoint")
    if exc.status_code < 500:
        return InvalidRequest(str(exc.detail), status=exc.status_code)
    return ServiceError(str(exc.detail), status=exc.status_code)


async def read_json_body(request: Request, *, max_bytes: int) -> bytes:
    """The raw body, refusing non-JSON content types and bodies over ``max_bytes`` (413)."""
    return await read_asgi_json_body(dict(request.scope["headers"]), request.receive, max_bytes=max_bytes)


async def read_asgi_json_body(headers: Mapping[bytes, bytes], receive: Receive, *, max_bytes: int) -> bytes:
    """``read_json_body`` on raw ASGI (lower-cased header names, as ASGI gives them); ``ClientDisconnect`` if the
    client leaves before the body is complete."""
    content_type = headers.get(b"content-type", b"application/json").split(b";")[0].strip().lower()
    if content_type != b"application/json" and not content_type.endswith(b"+json"):
        raise _unread(
            UnsupportedMediaType(f"content type must be application/json, got {content_type.decode('latin-1')!r}")
        )
    declared = headers.get(b"content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_bytes:
        raise _unread(PayloadTooLarge(f"body of {declared.decode()} bytes is over the {max_bytes}-byte limit"))
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] != "http.request":
            raise ClientDisconnect()
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > max_bytes:
            raise _unread(PayloadTooLarge(f"body is over the {max_bytes}-byte limit"))
        chunks.append(chunk)
        if not message.get("more_body", False):
            return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def _unread(error: ServiceError) -> ServiceError:
    error.close_connection = True
    return error


def parse_json_object(body: bytes) -> dict[str, Any]:
    """The body as a JSON object, or ``InvalidRequest`` saying what is wrong with it."""
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise InvalidRequest(f"body is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise InvalidRequest(NOT_AN_OBJECT)
    return data


def parse_exact_json_object(body: bytes) -> dict[str, Any]:
    """``parse_json_object`` with every number exact: orjson turns integers past 64 bits into floats, which is fine
    for the service's own fields but not for a client's payload handed on to an application. The stdlib parser,
    refusing NaN and Infinity as orjson does; slower, so only off the hot paths."""
    try:
        data = json.loads(body, parse_constant=_refuse_constant)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise InvalidRequest(f"body is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise InvalidRequest(NOT_AN_OBJECT)
    return data


def _refuse_constant(name: str) -> NoReturn:
    raise ValueError(f"{name} is not JSON")

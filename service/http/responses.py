"""JSON in and out (orjson): request bodies, responses, and the one error body
``{"error": {"code": ..., "message": ...}}``."""

from __future__ import annotations

import json
import math
from typing import Any, NoReturn

import orjson
from starlette.exceptions import HTTPException
from starlette.responses import JSONResponse, Response

from service.errors import InvalidRequest, MethodNotAllowed, NotFound, ServiceError

# The answer to a client that left before it could be answered (nginx's "client closed request"): nobody reads it,
# but the request metrics count it apart from the server's own errors.
CLIENT_CLOSED_REQUEST = 499


class ORJSONResponse(JSONResponse):
    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content, option=orjson.OPT_SERIALIZE_NUMPY)


NOT_AN_OBJECT = "body must be a JSON object"


def error_response(error: ServiceError, *, retry_after_s: int) -> Response:
    headers = {"Retry-After": str(retry_after_s)} if error.retry_after else {}
    if error.close_connection:
        headers["Connection"] = "close"
    if error.challenge:
        headers["WWW-Authenticate"] = error.challenge
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
        data = json.loads(body, parse_constant=_refuse_constant, parse_float=_finite_float)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise InvalidRequest(f"body is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise InvalidRequest(NOT_AN_OBJECT)
    return data


def _refuse_constant(name: str) -> NoReturn:
    raise ValueError(f"{name} is not JSON")


def _finite_float(text: str) -> float:
    """1e400 is valid JSON that no double holds: as orjson does, refuse it rather than hand on inf (which no JSON
    answer can carry)."""
    value = float(text)
    if math.isinf(value):
        raise ValueError(f"number {text[:32]} is out of range")
    return value

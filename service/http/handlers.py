"""Turning handler exceptions into answers, shared by both services."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

from prometheus_client import Counter
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response

from service.errors import ServiceError
from service.http.responses import CLIENT_CLOSED_REQUEST, error_response

logger = logging.getLogger(__name__)

Handler = Callable[[Request], Awaitable[Response]]


def guarded(handler: Handler, *, errors: Counter, retry_after_s: int) -> Handler:
    """Every ServiceError becomes its JSON answer; anything else a logged 500, never a crash. A client that left
    while its body was read gets a bodiless 499 that nobody reads: not an error of ours."""

    async def endpoint(request: Request) -> Response:
        try:
            return await handler(request)
        except ClientDisconnect:
            return Response(status_code=CLIENT_CLOSED_REQUEST)
        except ServiceError as exc:
            errors.labels(code=exc.code).inc()
            return error_response(exc, retry_after_s=retry_after_s)
        except Exception:
            logger.exception("unhandled error in %s", request.url.path)
            errors.labels(code=ServiceError.code).inc()
            return error_response(ServiceError("internal error"), retry_after_s=retry_after_s)

    return endpoint

"""One error tree; every error a client can cause maps to a status and a stable ``code``.

ServiceError (500 internal_error)
├── InvalidRequest (400 invalid_request)
│   ├── PayloadTooLarge (413 invalid_request)
│   └── UnsupportedMediaType (415 invalid_request)
├── NotFound (404 not_found)
├── MethodNotAllowed (405 method_not_allowed)
├── Unauthorized (401 unauthorized)
│   └── InvalidAssignment (401 invalid_assignment, a worker refusing an assignment; details: reason)
├── Overloaded (429 overloaded, Retry-After)
│   └── TooManyOpenRequests (429 too_many_open_requests, Retry-After)
├── NotReady (503 router_not_ready, Retry-After)
├── ShuttingDown (503 shutting_down, Retry-After)
└── StoreUnavailable (503 store_unavailable, Retry-After)
"""

from __future__ import annotations

from collections.abc import Mapping


class ServiceError(Exception):
    status: int = 500
    code: str = "internal_error"
    retry_after: bool = False
    challenge: str | None = None  # a 401's WWW-Authenticate (RFC 9110): the scheme the credential goes in
    # Answered before the request body was read to its end: the connection cannot carry another request, and
    # the answer says so (``Connection: close``) instead of the client finding out on its next send.
    close_connection: bool = False

    def __init__(self, message: str, *, status: int | None = None, details: Mapping[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.details = dict(details or {})  # extra fields of the error body, e.g. a machine-readable reason
        if status is not None:
            self.status = status


class InvalidRequest(ServiceError):
    status = 400
    code = "invalid_request"


class PayloadTooLarge(InvalidRequest):
    status = 413


class UnsupportedMediaType(InvalidRequest):
    status = 415


class RequestTimeout(ServiceError):
    status = 408
    code = "request_timeout"


class NotFound(ServiceError):
    status = 404
    code = "not_found"


class MethodNotAllowed(ServiceError):
    status = 405
    code = "method_not_allowed"


class Conflict(ServiceError):
    status = 409
    code = "conflict"


class TooManyWorkers(Conflict):
    """A new worker id on an endpoint that already has ``--max-workers-per-endpoint`` records: every route scans
    them all, so a holder of the worker token could otherwise slow every endpoint with made-up ids."""

    code = "too_many_workers"


class UrlTaken(Conflict):
    """A worker reported a URL that an active worker of another endpoint reports: any endpoint's worker token could
    otherwise point its endpoint's clients (and signed assignments) at another tenant's worker."""

    code = "url_taken"


class Unauthorized(ServiceError):
    status = 401
    code = "unauthorized"
    challenge: str | None = "Bearer"


class InvalidAssignment(Unauthorized):
    code = "invalid_assignment"
    challenge = None  # the credential is the signed auth_data in the body: no HTTP scheme to name


class Overloaded(ServiceError):
    status = 429
    code = "overloaded"
    retry_after = True


class TooManyOpenRequests(Overloaded):
    """A new request on an endpoint already holding ``--max-open-requests``: each open request is state kept until it
    is reported done or its ttl passes, so one endpoint's clients (routing with no worker ready, say) could otherwise
    fill the dispatcher's memory, or Redis, for every endpoint."""

    code = "too_many_open_requests"


class NotReady(ServiceError):
    status = 503
    code = "router_not_ready"
    retry_after = True


class ShuttingDown(ServiceError):
    status = 503
    code = "shutting_down"
    retry_after = True
    # raised only while a service drains, when every answer says Connection: close (http/middleware.py): the
    # client's next request opens a new connection, to another replica


class StoreUnavailable(ServiceError):
    """The dispatcher's state store (Redis) cannot be reached; the client should retry."""

    status = 503
    code = "store_unavailable"
    retry_after = True

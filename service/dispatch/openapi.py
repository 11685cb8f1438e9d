"""OpenAPI 3.1 description of the dispatcher's HTTP API (served at /openapi.json)."""

from __future__ import annotations

import functools
from typing import Any

from service import __version__
from service.dispatch.records import STATUS_KEYS, WorkerState
from service.dispatch.schemas import MAX_ID_CHARS, MAX_RELEASE_BATCH, MAX_REQUEST_IDX, MAX_URL_CHARS
from service.http.openapi import ERROR_SCHEMA, common_paths, error, json_content


def _route_request(max_cost: float) -> dict[str, Any]:
    return {
        "type": "object",
        "required": ["endpoint", "cost"],
        "description": "Unknown fields (Vast's SDK sends replay_timeout) are ignored.",
        "properties": {
            "endpoint": {"type": "string", "minLength": 1, "maxLength": 256},
            "api_key": {
                "type": ["string", "null"],
                "description": "or `Authorization: Bearer`, or the `api_key` query parameter",
            },
            "cost": {
                "type": "number",
                "minimum": 0,
                "maximum": max_cost,
                "description": "the request's workload in the endpoint's units (at most the dispatcher's --max-cost)",
            },
            "request_idx": {
                "type": ["integer", "null"],
                "minimum": 0,
                "maximum": MAX_REQUEST_IDX,
                "description": "only to retry: the request_idx of an earlier answer (0 or absent: a new request)",
            },
        },
    }


# the key may come as a query parameter too (Vast's clients send it so); the body's and the header's win
_API_KEY_QUERY = {
    "name": "api_key",
    "in": "query",
    "required": False,
    "schema": {"type": "string"},
    "description": "the endpoint's api key, when neither the body nor `Authorization: Bearer` carries one",
}

# schemas.parse_idempotency_key: visible ASCII but '"' and '\', bare or quoted
IDEMPOTENCY_KEY_PATTERN = '^[ \t]*("[!#-\\[\\]-~]{1,255}"|[!#-\\[\\]-~]{1,255})[ \t]*$'
_IDEMPOTENCY_KEY = {
    "name": "Idempotency-Key",
    "in": "header",
    "required": False,
    "schema": {"type": "string", "pattern": IDEMPOTENCY_KEY_PATTERN},
    "description": "names a new request (ignored beside a request_idx): the same key again on this endpoint, while"
    " that request is held, is the same call again (that request, on its worker while that one can take work), so a"
    " client whose first answer was lost holds no load twice",
}

_ASSIGNED = {
    "type": "object",
    "required": [
        "endpoint",
        "url",
        "cost",
        "reqnum",
        "request_idx",
        "signature",
        "key_id",
        "expires_at_ms",
        "__request_id",
    ],
    "properties": {
        "endpoint": {"type": "string"},
        "url": {"type": "string", "description": "the worker to send the request to"},
        "cost": {"type": "number"},
        "reqnum": {"type": "integer", "description": "this worker's request number, increasing"},
        "request_idx": {"type": "integer", "description": "the request's lifetime id; pass it to retry"},
        "signature": {"type": "string", "description": "Ed25519 over the canonical assignment, hex"},
        "key_id": {"type": "string", "description": "which /pubkey/ key signed"},
        "expires_at_ms": {"type": "integer", "description": "unix milliseconds after which workers refuse it"},
        "__request_id": {"type": "string", "format": "uuid"},
    },
}

_NO_READY = {
    "type": "object",
    "required": ["endpoint", "status", "request_idx", "__request_id"],
    "properties": {
        "endpoint": {"type": "string"},
        "status": {
            "type": "object",
            "description": "the endpoint's workers by state",
            "properties": {key: {"type": "integer", "minimum": 0} for key in STATUS_KEYS},
        },
        "request_idx": {"type": "integer", "description": "poll /route/ again with it; no load is added"},
        "__request_id": {"type": "string", "format": "uuid"},
    },
}


# What schemas accepts, as ECMA-262 patterns: printable ASCII without '"' or '\\' for ids; for worker URLs also
# without spaces, and without '?', '#' or '@' (a base URL: no query, fragment or credentials) and a non-empty host.
# The URL pattern is looser than the parser, which also checks the host:port (an IPv6 or IPv4 literal's form).
SAFE_ID_PATTERN = r"^[ !#-\[\]-~]+$"
WORKER_URL_PATTERN = r"^[hH][tT][tT][pP][sS]?://[!$-.0->A-\[\]-~]+(/[!$-/0->A-\[\]-~]*)?$"
_ID = {"type": "string", "minLength": 1, "maxLength": MAX_ID_CHARS, "pattern": SAFE_ID_PATTERN}


def _worker_report(max_value: float) -> dict[str, Any]:
    return {
        "type": "object",
        "required": ["endpoint", "id", "url", "state", "max_perf"],
        "properties": {
            "endpoint": {"type": "string", "minLength": 1, "maxLength": MAX_ID_CHARS},
            "id": _ID,
            "url": {
                "type": "string",
                "maxLength": MAX_URL_CHARS,
                "pattern": WORKER_URL_PATTERN,
                "description": "the worker's base URL; kept, sent to clients and signed in one spelling: scheme and"
                " host lowercased, the default port and trailing slashes dropped. An IPv4 host must be a dotted quad"
                " (not a name ending in a number, not ::ffff:a.b.c.d); a path has no '.', '..' or empty segments and"
                " no '%'",
            },
            "state": {"type": "string", "enum": [s.value for s in WorkerState]},
            "max_perf": {
                "type": "number",
                "minimum": 0,
                "maximum": max_value,
                "description": "workload units per second; must be > 0 when state is ready (0 is for a worker "
                "still loading or failed, which has not measured one)",
            },
            "cur_load": {
                "type": ["number", "null"],
                "minimum": 0,
                "maximum": max_value,
                "description": "null or absent: 0",
            },
            "in_flight": {"type": ["integer", "null"], "minimum": 0, "description": "null or absent: 0"},
        },
    }


_RELEASE = {
    "type": "object",
    "required": ["endpoint", "request_idxs"],
    "properties": {
        "endpoint": {"type": "string", "minLength": 1, "maxLength": MAX_ID_CHARS},
        "id": {
            **_ID,
            "description": "the releasing worker: requests a retry moved to another worker are left with it (not_held)",
        },
        "request_idxs": {
            "type": "array",
            "maxItems": MAX_RELEASE_BATCH,
            "items": {"type": "integer", "minimum": 1, "maximum": MAX_REQUEST_IDX},
        },
        "success": {"type": "boolean"},
    },
}

_OBJECT = {"type": "object"}


def _post(
    summary: str,
    op: str,
    body: dict[str, Any],
    ok: dict[str, Any],
    *,
    auth: str,
    key_in_body: bool = False,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    # {} = no header needed: /route/ also takes its key in the body or the query string
    security: list[dict[str, list[str]]] = [{auth: []}, {}] if key_in_body else [{auth: []}]
    parameters = {"parameters": [_API_KEY_QUERY, _IDEMPOTENCY_KEY]} if key_in_body else {}
    return {
        "post": {
            "summary": summary,
            "operationId": op,
            "security": security,
            **parameters,
            "requestBody": {"required": True, "content": json_content(body)},
            "responses": {
                "200": {"description": "ok", "content": json_content(ok)},
                "400": error("invalid_request: malformed body or wrong types"),
                "401": error("unauthorized: missing or wrong key"),
                "413": error("invalid_request: body over the size limit"),
                "415": error("invalid_request: content type is not application/json"),
                "408": error("request_timeout: the body did not arrive within the configured time"),
                "503": error("store_unavailable or shutting_down", retry_after=True),
                **(extra or {}),
            },
        }
    }


@functools.cache
def dispatcher_openapi(*, max_cost: float, max_report_value: float) -> dict[str, Any]:
    """The document for these limits (settings: ``--max-cost``, ``--max-report-value``), so that a schema-valid
    value is never one the dispatcher refuses for its size."""
    return {
        "openapi": "3.1.0",
        "info": {"title": "LLM worker dispatcher", "version": __version__},
        "paths": {
            "/route/": _post(
                "Pick a ready worker and sign the assignment (or report why none is ready)",
                "route",
                _route_request(max_cost),
                {"oneOf": [_ASSIGNED, _NO_READY]},
                auth="apiKey",
                key_in_body=True,
                extra={
                    "429": error(
                        "too_many_open_requests: a new request on an endpoint holding --max-open-requests open"
                        " requests (a retry with request_idx still routes)",
                        retry_after=True,
                    )
                },
            ),
            "/worker_status/": _post(
                "A worker reports its state, speed and load (heartbeat)",
                "workerStatus",
                _worker_report(max_report_value),
                _OBJECT,
                auth="workerToken",
                extra={
                    "409": error(
                        "too_many_workers: a new id on an endpoint at --max-workers-per-endpoint; url_taken: the url"
                        " is reported by an active worker of another endpoint"
                    )
                },
            ),
            "/delete_requests/": _post(
                "A worker reports requests done; their load is released",
                "deleteRequests",
                _RELEASE,
                _OBJECT,
                auth="workerToken",
            ),
            "/pubkey/": {
                "get": {
                    "summary": "Public keys workers verify assignments with (current first)",
                    "operationId": "pubkey",
                    "responses": {"200": {"description": "keys", "content": json_content(_OBJECT)}},
                }
            },
            "/endpoints/{name}/": {
                "get": {
                    "summary": "Operator view: workers and the autoscaling decision of one endpoint",
                    "operationId": "endpointInfo",
                    "security": [{"apiKey": []}],
                    "parameters": [{"name": "name", "in": "path", "required": True, "schema": {"type": "string"}}],
                    "responses": {
                        "200": {"description": "endpoint state", "content": json_content(_OBJECT)},
                        "401": error("unauthorized"),
                        "404": error("not_found (admin token, unknown endpoint)"),
                        "503": error("store_unavailable", retry_after=True),
                    },
                }
            },
            "/health": {
                "get": {
                    "summary": "Readiness: 200 when serving (degraded while the shared store is down), 503 draining",
                    "operationId": "health",
                    "responses": {
                        "200": {"description": "ready", "content": json_content(_OBJECT)},
                        "503": {"description": "not ready", "content": json_content(_OBJECT)},
                    },
                }
            },
            **common_paths(),
        },
        "components": {
            "schemas": {"Error": ERROR_SCHEMA},
            "securitySchemes": {
                "apiKey": {"type": "http", "scheme": "bearer", "description": "an endpoint's client api key"},
                "workerToken": {"type": "http", "scheme": "bearer", "description": "an endpoint's worker token"},
            },
        },
    }

"""OpenAPI 3.1 description of the dispatcher's HTTP API (served at /openapi.json)."""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

from service import __version__
from service.dispatch.autoscale import Action, ScaleDecision
from service.dispatch.records import STATUS_KEYS, WorkerState
from service.dispatch.schemas import (
    MAX_ID_CHARS,
    MAX_IN_FLIGHT,
    MAX_RELEASE_BATCH,
    MAX_REQNUM,
    MAX_REQUEST_IDX,
    MAX_URL_CHARS,
)
from service.dispatch.signing import ALGORITHM, HASH_HEX_DIGITS, MAX_VERIFIED_BATCH_SIZE, NONCE_HEX_DIGITS
from service.http.openapi import (
    ERROR_SCHEMA,
    common_paths,
    error,
    json_content,
    unauthorized,
    unsupported_media_type,
)

# schemas._integer: the server takes what JSON Schema's "integer" takes, 5.0 included
_INTEGRAL = "a number with no fractional part (5.0 counts as 5)"


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
                "description": "only to retry: the request_idx of an earlier answer (0 or absent: a new request);"
                f" {_INTEGRAL}",
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
        "signature": {
            "type": "string",
            "description": "Ed25519, hex: over the canonical assignment, or with `batch` over its batch's Merkle root",
        },
        "batch": {
            "type": "object",
            "description": "present when the signature covers a batch: this assignment's RFC 9162 inclusion proof",
            "required": ["index", "size", "nonce", "path"],
            "properties": {
                "index": {"type": "integer", "minimum": 0, "maximum": MAX_VERIFIED_BATCH_SIZE - 1},
                "size": {"type": "integer", "minimum": 2, "maximum": MAX_VERIFIED_BATCH_SIZE},
                "nonce": {"type": "string", "pattern": f"^[0-9a-f]{{{NONCE_HEX_DIGITS}}}$"},
                "path": {
                    "type": "array",
                    "maxItems": (MAX_VERIFIED_BATCH_SIZE - 1).bit_length(),
                    "items": {
                        "type": "string",
                        "pattern": f"^[0-9a-f]{{{HASH_HEX_DIGITS}}}$",
                        "description": "SHA-256",
                    },
                },
            },
        },
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
            "required": list(STATUS_KEYS),  # every key, 0 included (selection.status_breakdown, redis_store.route)
            "properties": {key: {"type": "integer", "minimum": 0} for key in STATUS_KEYS},
        },
        "request_idx": {"type": "integer", "description": "poll /route/ again with it; no load is added"},
        "__request_id": {"type": "string", "format": "uuid"},
    },
}


# What schemas accepts, as ECMA-262 patterns: printable ASCII without '"' or '\\' for ids. For worker URLs
# (worker_url.canonical_url): the host:port as its _AUTHORITY reads it (a port of 1 to 5 digits, none empty); a path
# of printable ASCII without spaces, '"', '\\', '%' (no percent-escapes), '?', '#' or '@' (no query, fragment or
# credentials) and without empty, '.' or '..' segments (trailing slashes are dropped, so they may be there). Looser
# than the parser only in what a pattern cannot check cheaply: an IPv4 or IPv6 literal's form and the port's range.
SAFE_ID_PATTERN = r"^[ !#-\[\]-~]+$"
_HOST = r"(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9._~!$&'()*+,;=-]+)(:[0-9]{1,5})?"
_PATH_CHAR_BUT_DOT = r"!$&-\-0->A-\[\]-~"  # '&' to '-' then '0' to '>': no '%', '.', '/', '?' or '@'
_PATH_CHAR = "." + _PATH_CHAR_BUT_DOT
# a segment that is not '.' or '..' (no lookahead: not every generator of examples supports it): 3+ characters, or
# 1 or 2 not starting with '.', or '.' and one other than '.'
_SEGMENT = f"([{_PATH_CHAR}]{{3,}}|[{_PATH_CHAR_BUT_DOT}][{_PATH_CHAR}]?|\\.[{_PATH_CHAR_BUT_DOT}])"
WORKER_URL_PATTERN = f"^[hH][tT][tT][pP][sS]?://{_HOST}(/{_SEGMENT})*/*$"
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
                " (not a name ending in a number, not ::ffff:a.b.c.d), a port in 1..65535; a path has no '.', '..'"
                " or empty segments and no '%'",
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
            "in_flight": {
                "type": ["integer", "null"],
                "minimum": 0,
                "maximum": MAX_IN_FLIGHT,
                "description": f"null or absent: 0; {_INTEGRAL}",
            },
            "reqnum_floor": {
                "type": ["integer", "null"],
                "minimum": 0,
                "maximum": MAX_REQNUM,
                "description": "the reqnum at or below which this worker process refuses every assignment (as"
                " issued_before_start): the reqnum its first report after starting was answered. Requests this"
                " worker holds with such a reqnum died with the process before, and their load is released at once"
                " (not at the request ttl); each stays known until its expiry, so a client's retry of it routes"
                " afresh. Requests assigned after that answer stay. null or absent: nothing is released, as for"
                f" workers that do not send it; {_INTEGRAL}",
            },
        },
        # schemas.parse_worker_report: picking divides by a ready worker's max_perf
        "if": {"required": ["state"], "properties": {"state": {"const": WorkerState.READY.value}}},
        "then": {"properties": {"max_perf": {"exclusiveMinimum": 0}}},
    }


# what the server checks beyond the pattern (worker_url.canonical_url), for the 400's description
_URL_CHECKS = (
    "; a url's host must also be a valid IPv6 address (not an IPv4-mapped or -compatible one), a dotted quad of"
    " decimals, or a name whose last label is not a number, and its port in 1..65535, which the pattern does not"
    " check"
)


_RELEASE = {
    "type": "object",
    "required": ["endpoint", "request_idxs"],
    "properties": {
        "endpoint": {"type": "string", "minLength": 1, "maxLength": MAX_ID_CHARS},
        "id": {
            **_ID,
            "type": ["string", "null"],  # schemas.parse_release: null is absent
            "description": "the releasing worker: requests a retry moved to another worker are left with it"
            " (not_held); null or absent: any holder",
        },
        "request_idxs": {
            "type": "array",
            "maxItems": MAX_RELEASE_BATCH,
            "items": {"type": "integer", "minimum": 1, "maximum": MAX_REQUEST_IDX, "description": _INTEGRAL},
        },
        "success": {"type": "boolean"},
    },
}


# -- answers (api.DispatcherApi) ---------------------------------------------------------------------------------
def _object(properties: dict[str, Any], *, optional: tuple[str, ...] = ()) -> dict[str, Any]:
    """An object that always carries every one of ``properties`` but those ``optional``."""
    return {"type": "object", "required": [k for k in properties if k not in optional], "properties": properties}


_COUNT = {"type": "integer", "minimum": 0}

_REPORTED = _object(
    {
        "ok": {"const": True},
        "endpoint": {"type": "string"},
        "id": {"type": "string"},
        "reqnum": {"type": "integer", "description": "the worker's latest request number"},
        "load": {"type": "number", "description": "workload units the dispatcher counts on the worker"},
        "heartbeat_timeout_s": {"type": "number", "description": "report again within this"},
    }
)

_RELEASED = _object(
    {
        "ok": {"const": True},
        "released": {**_COUNT, "description": "requests whose load was given back"},
        "unknown": {**_COUNT, "description": "already released, expired, or never issued for this endpoint"},
        "not_held": {**_COUNT, "description": "held by another worker (a retry moved them): left with it"},
    }
)

_HEX = {"type": "string", "pattern": "^[0-9a-f]+$"}
_PUBKEY = _object(
    {
        "algorithm": {"const": ALGORITHM},
        "key_id": {**_HEX, "description": "the current (signing) key's"},
        "public_key": {**_HEX, "description": "the current key, hex"},
        "keys": {
            "type": "array",
            "minItems": 1,
            "description": "every key to accept: the current one first, then a next one and retired ones",
            "items": _object(
                {
                    "key_id": _HEX,
                    "algorithm": {"const": ALGORITHM},
                    "public_key": _HEX,
                    "current": {"type": "boolean"},
                }
            ),
        },
    }
)


def _health(statuses: list[str]) -> dict[str, Any]:
    """app.DispatcherService.health: ``error`` exactly when the store did not answer (``store_up`` false)."""
    schema = _object(
        {
            "status": {"type": "string", "enum": statuses},
            "version": {"type": "string"},
            "store": {"type": "string", "enum": ["memory", "redis"]},
            "endpoints": {**_COUNT, "description": "endpoints configured"},
            "key_id": {**_HEX, "description": "the signing key's"},
            "store_up": {"type": "boolean", "description": "the state store answered PING"},
            "error": {"type": "string", "description": "why the store is taken as down"},
        },
        optional=("error",),
    )
    store_down: dict[str, Any] = {"required": ["error"]}
    store_up: dict[str, Any] = {"not": {"required": ["error"]}}
    if "ok" in statuses:  # not draining: the status says whether the store answered
        store_down["properties"] = {"status": {"const": "degraded"}}
        store_up["properties"] = {"status": {"const": "ok"}}
    return {
        **schema,
        "if": {"required": ["store_up"], "properties": {"store_up": {"const": True}}},
        "then": store_up,
        "else": store_down,
    }


_NUMBER = {"type": "number"}
_WORKER = _object(  # schemas.worker_json
    {
        "id": {"type": "string"},
        "url": {"type": "string"},
        "state": {"type": "string", "enum": [s.value for s in WorkerState]},
        "active": {"type": "boolean", "description": "reported within the heartbeat timeout"},
        "max_perf": _NUMBER,
        "cur_load": _NUMBER,
        "in_flight": _COUNT,
        "load": _NUMBER,
        "open_requests": _COUNT,
        "reqnum": {"type": "integer"},
        "last_seen_s_ago": {**_NUMBER, "minimum": 0},
    }
)
_AUTOSCALE_TYPES: dict[str, dict[str, Any]] = {
    "endpoint": {"type": "string"},
    "perf_per_worker": {"type": ["number", "null"], "description": "null: no ready worker has measured one"},
    "action": {"type": "string", "enum": [a.value for a in Action]},
    **dict.fromkeys(
        ("waiting_requests", "ready_workers", "starting_workers", "wanted_workers", "wanted_cold_workers"), _COUNT
    ),
}
_ENDPOINT_INFO = _object(
    {
        "endpoint": {"type": "string"},
        "settings": _object(
            {
                "max_queue_time_s": _NUMBER,
                "target_util": _NUMBER,
                "min_workers": _COUNT,
                "max_workers": _COUNT,
                "cold_workers": _COUNT,
            }
        ),
        "workers": {"type": "array", "items": _WORKER},
        # autoscale.ScaleDecision.to_json: every field (the float ones as numbers)
        "autoscale": _object(
            {f.name: _AUTOSCALE_TYPES.get(f.name, _NUMBER) for f in dataclasses.fields(ScaleDecision)}
        ),
    }
)


def _post(
    summary: str,
    op: str,
    body: dict[str, Any],
    ok: dict[str, Any],
    *,
    auth: str,
    key_in_body: bool = False,
    bad_request: str = "",
    unavailable: str = "store_unavailable",
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
                "400": error("invalid_request: malformed body or wrong types" + bad_request),
                "401": unauthorized("unauthorized: missing or wrong key"),
                "413": error("invalid_request: body over the size limit"),
                "415": unsupported_media_type(),
                "408": error("request_timeout: the body did not arrive within the configured time"),
                "429": error(_OVERLOADED, retry_after=True),
                "503": error(unavailable, retry_after=True),
                **(extra or {}),
            },
        }
    }


_OVERLOADED = (
    "overloaded: the request bodies being read fill --max-buffered-body-bytes (or, for a request without a known"
    " key or token in its Authorization header or api_key query parameter, --max-unauthenticated-body-bytes)"
)


@functools.cache
def dispatcher_openapi(*, max_cost: float, max_report_value: float, admin_token: bool = False) -> dict[str, Any]:
    """The document for these limits (settings: ``--max-cost``, ``--max-report-value``), so that a schema-valid
    value is never one the dispatcher refuses for its size; ``admin_token``: whether ``--admin-token`` is set, which
    /endpoints/{name}/ then takes besides the endpoint's key. Cached per arguments: one document per setting."""
    operator: list[dict[str, list[str]]] = [{"apiKey": []}, {"adminToken": []}] if admin_token else [{"apiKey": []}]
    schemes = {
        "apiKey": {"type": "http", "scheme": "bearer", "description": "an endpoint's client api key"},
        "workerToken": {"type": "http", "scheme": "bearer", "description": "an endpoint's worker token"},
    }
    if admin_token:
        schemes["adminToken"] = {"type": "http", "scheme": "bearer", "description": "the dispatcher's --admin-token"}
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
                unavailable="store_unavailable, or shutting_down (draining)",
                extra={
                    "429": error(
                        "too_many_open_requests: a new request on an endpoint holding --max-open-requests open"
                        f" requests (a retry with request_idx still routes); or {_OVERLOADED}",
                        retry_after=True,
                    )
                },
            ),
            "/worker_status/": _post(
                "A worker reports its state, speed and load (heartbeat)",
                "workerStatus",
                _worker_report(max_report_value),
                _REPORTED,
                auth="workerToken",
                bad_request=_URL_CHECKS,
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
                _RELEASED,
                auth="workerToken",
            ),
            "/pubkey/": {
                "get": {
                    "summary": "Public keys workers verify assignments with (current first)",
                    "operationId": "pubkey",
                    "responses": {"200": {"description": "keys", "content": json_content(_PUBKEY)}},
                }
            },
            "/endpoints/{name}/": {
                "get": {
                    "summary": "Operator view: workers and the autoscaling decision of one endpoint",
                    "operationId": "endpointInfo",
                    "security": operator,
                    "parameters": [{"name": "name", "in": "path", "required": True, "schema": {"type": "string"}}],
                    "responses": {
                        "200": {"description": "endpoint state", "content": json_content(_ENDPOINT_INFO)},
                        "401": unauthorized("unauthorized: missing or wrong key"),
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
                        "200": {
                            "description": "ready (degraded: the shared store did not answer)",
                            "content": json_content(_health(["ok", "degraded"])),
                        },
                        "503": {"description": "draining", "content": json_content(_health(["draining"]))},
                    },
                }
            },
            **common_paths(),
        },
        "components": {
            "schemas": {"Error": ERROR_SCHEMA},
            "securitySchemes": schemes,
        },
    }

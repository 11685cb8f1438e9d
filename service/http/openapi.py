"""OpenAPI pieces both services' documents share: the error shape and the /metrics and /openapi.json paths."""

from __future__ import annotations

from typing import Any

ERROR_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["code", "message"],
            "properties": {
                "code": {"type": "string"},
                "message": {"type": "string"},
                # an open set (not an enum): a client that branches on it must pass over values it does not know
                "reason": {
                    "type": "string",
                    "description": "machine-readable detail of `code`, where there is one to branch on: the"
                    " dispatcher's 400 `unknown_request_idx` (a retry's request_idx is no longer known: nothing is"
                    " held for it, route the request again as a new one); a worker's `invalid_assignment`: 401"
                    " bad_format, bad_signature, wrong_url, wrong_endpoint, replayed; 503 (route the request again)"
                    " unknown_key, expired, too_old, issued_before_start",
                },
            },
        }
    },
}


def json_content(schema: dict[str, Any]) -> dict[str, Any]:
    return {"application/json": {"schema": schema}}


def error(description: str, *, retry_after: bool = False) -> dict[str, Any]:
    response: dict[str, Any] = {
        "description": description,
        "content": json_content({"$ref": "#/components/schemas/Error"}),
    }
    if retry_after:
        response["headers"] = {"Retry-After": {"schema": {"type": "integer"}, "description": "seconds"}}
    return response


def unsupported_media_type() -> dict[str, Any]:
    # body.BodyReader.read takes any JSON media type, application/*+json as RFC 6839 names them
    return error("invalid_request: content type is neither application/json nor application/*+json")


def unauthorized(description: str) -> dict[str, Any]:
    """A 401: every one names the scheme its credential goes in (``errors.Unauthorized.challenge``, RFC 9110)."""
    challenge = {"required": True, "schema": {"type": "string", "const": "Bearer"}, "description": "Bearer"}
    return {**error(description), "headers": {"WWW-Authenticate": challenge}}


_LIVEZ = {
    "type": "object",
    "required": ["status"],
    "properties": {"status": {"type": "string", "enum": ["alive", "failed"]}},
}


def common_paths() -> dict[str, Any]:
    return {
        "/livez": {
            "get": {
                "summary": "Liveness for orchestrators: 200 while the process serves, loading and draining included",
                "operationId": "livez",
                "responses": {
                    "200": {"description": "alive", "content": json_content(_LIVEZ)},
                    "503": {"description": "failed for good: restart the process", "content": json_content(_LIVEZ)},
                },
            }
        },
        "/metrics": {
            "get": {
                "summary": "Prometheus metrics",
                "operationId": "metrics",
                "responses": {
                    "200": {
                        "description": "text exposition format",
                        "content": {"text/plain": {"schema": {"type": "string"}}},
                    }
                },
            }
        },
        "/openapi.json": {
            "get": {
                "summary": "This document",
                "operationId": "openapi",
                "responses": {"200": {"description": "OpenAPI 3.1", "content": json_content({"type": "object"})}},
            }
        },
    }

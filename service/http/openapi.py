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
            "properties": {"code": {"type": "string"}, "message": {"type": "string"}},
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

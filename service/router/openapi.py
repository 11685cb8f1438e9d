"""OpenAPI 3.1 description of the router's HTTP API (served at /openapi.json)."""

from __future__ import annotations

import functools
from typing import Any

from service import __version__
from service.http.openapi import (
    ERROR_SCHEMA,
    common_paths,
    error,
    json_content,
    unauthorized,
    unsupported_media_type,
)
from service.router.model_card import EMBEDDING_DIM
from service.router.weights import MAX_COST_WEIGHT

_PROMPT = {
    "type": "string",
    "minLength": 1,
    # not only whitespace (\\s and what Python's str.strip removes besides): that embeds to nothing worth routing on
    "pattern": "[^\\s\\x1c-\\x1f\\x85]",
    "description": "The user text to route (not only whitespace, unless an embedding is given)."
    " Characters the tokenizer drops (control, zero-width) are embedded as sentence-transformers embeds them.",
}
_EMBEDDING = {
    "type": "array",
    "items": {"type": "number"},
    "contains": {"not": {"const": 0}},  # an all-zero vector has no direction to search with
    "minItems": EMBEDDING_DIM,
    "maxItems": EMBEDDING_DIM,
    "description": f"A precomputed {EMBEDDING_DIM}-d all-MiniLM-L6-v2 embedding; skips the embedder.",
}

# null is the same as an absent field (clients generated from this document often send null for "unset")
_ROUTE_REQUEST = {
    "type": "object",
    "description": "Give `prompt` or `embedding` (with both, the embedding is used). Unknown fields are ignored; "
    "a null field counts as absent.",
    "properties": {
        "prompt": {"type": ["string", "null"], "description": _PROMPT["description"]},  # any text beside an embedding
        "embedding": {**_EMBEDDING, "type": ["array", "null"]},
        "available_models": {
            "type": ["array", "null"],
            "items": {"type": "string", "minLength": 1},
            "minItems": 1,
            "description": "Restrict candidates to these models (all models when omitted).",
        },
        "cost_weight": {
            "type": ["number", "null"],
            "minimum": 0,
            "maximum": MAX_COST_WEIGHT,
            "description": "lambda for this call: 0 = quality first, 1 and more = cheap first. "
            "Default: the weights' default_lambda.",
        },
    },
    "anyOf": [
        {"required": ["prompt"], "properties": {"prompt": _PROMPT}},
        {"required": ["embedding"], "properties": {"embedding": _EMBEDDING}},
    ],
}

_ROUTE_RESPONSE = {
    "type": "object",
    "required": [
        "selected_model",
        "cluster_id",
        "expected_error",
        "cost_adjusted_score",
        "all_scores",
        "cache_hit",
        "usage",
        "cost_weight",
        "clusters",
        "weights_version",
    ],
    "properties": {
        "selected_model": {"type": "string", "description": "argmin of expected_error + lambda * cost_per_1k"},
        "cluster_id": {"type": "integer", "minimum": 0, "description": "nearest centroid"},
        "expected_error": {"type": "number", "description": "predicted error of selected_model on cluster_id"},
        "cost_adjusted_score": {"type": "number", "description": "the minimised score"},
        "all_scores": {
            "type": "object",
            "additionalProperties": {"type": "number"},
            "description": "score of every candidate considered",
        },
        "cache_hit": {"type": "boolean", "description": "cluster came from the LRU cache"},
        "usage": {
            "type": "object",
            "required": ["routing_ms", "embedding_ms", "queue_ms"],
            "properties": {
                "routing_ms": {"type": "number", "description": "cache lookup, centroid search and scoring"},
                "embedding_ms": {
                    "type": "number",
                    "description": "forward pass of the batch (0 on cache hit or when an embedding was supplied)",
                },
                "queue_ms": {"type": "number", "description": "time waiting for a batch"},
            },
        },
        "cost_weight": {"type": "number", "description": "lambda used"},
        "clusters": {
            "type": "array",
            "description": "nearest clusters, best first, with cosine similarity",
            "items": {
                "type": "object",
                "required": ["cluster_id", "similarity"],
                "properties": {"cluster_id": {"type": "integer"}, "similarity": {"type": "number"}},
            },
        },
        "weights_version": {"type": "string"},
    },
}

_HEALTH = {
    "type": "object",
    "required": ["status"],
    "properties": {
        "status": {"type": "string", "enum": ["ok", "loading", "draining", "failed"]},
        "version": {"type": "string"},
        "device": {"type": "string"},
        "embedder": {"type": "string"},
        "models": {"type": "integer"},
        "clusters": {"type": "integer"},
        "weights_version": {"type": "string"},
        "default_cost_weight": {"type": "number"},
        "queue": {"type": "integer"},
        "index": {
            "type": "string",
            "description": "centroid search backend: faiss-cpu, faiss-gpu, torch-cpu, torch-cuda",
        },
        "encoder": {
            "type": "object",
            "description": (
                "how the encoder runs: dtype, torchscript; on CPU onednn_linear; on CUDA cuda_graphs (count) and"
                " fused_kernels"
            ),
        },
        "error": {"type": "string"},
    },
}


_MODELS = {
    "type": "object",
    "required": ["object", "data", "weights_version", "default_cost_weight", "clusters", "cost_unit"],
    "properties": {
        "object": {"const": "list"},
        "data": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["id", "object", "cost_per_1k", "expected_error"],
                "properties": {
                    "id": {"type": "string", "description": "the name available_models takes"},
                    "object": {"const": "model"},
                    "cost_per_1k": {"type": "number", "description": "the cost the routing rule weighs (cost_unit)"},
                    "expected_error": {
                        "type": "object",
                        "description": "the model's predicted error across the clusters",
                        "required": ["min", "mean", "max"],
                        "properties": {name: {"type": "number"} for name in ("min", "mean", "max")},
                    },
                    "price_usd_per_1k": {"type": "object", "description": "list prices, where the weights record them"},
                },
            },
        },
        "weights_version": {"type": "string"},
        "default_cost_weight": {"type": "number"},
        "clusters": {"type": "integer"},
        "cost_unit": {"type": "string"},
    },
}


_ADMIN_TOKEN = {"type": "http", "scheme": "bearer", "description": "the router's --admin-token"}


def _reload_auth(admin_token: bool) -> dict[str, Any]:
    """api._check_admin: with --admin-token every call needs it (anonymous: 401); without one, none is asked for."""
    return {"security": [{"adminToken": []}]} if admin_token else {}


def _reload_401(admin_token: bool) -> dict[str, Any]:
    return {"401": unauthorized("unauthorized: missing or wrong admin token")} if admin_token else {}


@functools.cache
def router_openapi(max_prompt_chars: int, admin_token: bool = False) -> dict[str, Any]:
    """The document for a server started with ``--max-prompt-chars max_prompt_chars`` (longer prompts: 413) and,
    if ``admin_token``, ``--admin-token`` (then /admin/reload takes no anonymous call). Cached per arguments."""
    json_body = {"application/json": {"schema": {"$ref": "#/components/schemas/RouteRequest"}}}
    properties = _ROUTE_REQUEST["properties"]
    assert isinstance(properties, dict)
    route_request = {
        **_ROUTE_REQUEST,
        "properties": {**properties, "prompt": {**properties["prompt"], "maxLength": max_prompt_chars}},
    }
    return {
        "openapi": "3.1.0",
        "info": {"title": "LLM model router", "version": __version__},
        "paths": {
            "/v1/route": {
                "post": {
                    "summary": "Pick the model for a prompt",
                    "operationId": "route",
                    "requestBody": {"required": True, "content": json_body},
                    "responses": {
                        "200": {
                            "description": "routing decision",
                            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/RouteResponse"}}},
                        },
                        "400": error("invalid_request: malformed body, wrong types, unknown models, bad embedding"),
                        "413": error("invalid_request: body or prompt over the configured limit"),
                        "415": unsupported_media_type(),
                        "408": error("request_timeout: the body did not arrive within the configured time"),
                        "429": error("overloaded: the admission queue is full", retry_after=True),
                        "503": error("router_not_ready (loading) or shutting_down (draining)", retry_after=True),
                    },
                }
            },
            "/v1/models": {
                "get": {
                    "summary": "The models the router picks from, with their costs and expected errors",
                    "operationId": "models",
                    "responses": {
                        "200": {"description": "the serving weights' models", "content": json_content(_MODELS)},
                        "503": error("router_not_ready: the weights are still loading", retry_after=True),
                    },
                }
            },
            "/health": {
                "get": {
                    "summary": "Readiness for load balancers: 200 when serving, 503 while loading or draining",
                    "operationId": "health",
                    "responses": {
                        "200": {"description": "ready", "content": {"application/json": {"schema": _HEALTH}}},
                        "503": {
                            "description": "loading, draining or failed",
                            "content": {"application/json": {"schema": _HEALTH}},
                        },
                    },
                }
            },
            "/admin/reload": {
                "post": {
                    "summary": "Load a new weights file without downtime: validated, swapped atomically, cache cleared",
                    "operationId": "reload",
                    **_reload_auth(admin_token),
                    "requestBody": {
                        "required": False,
                        "content": {
                            "application/json": {
                                "schema": {
                                    "type": "object",
                                    "properties": {
                                        "path": {
                                            "type": ["string", "null"],
                                            "minLength": 1,
                                            "description": "weights file; absent or null: the configured one",
                                        }
                                    },
                                }
                            }
                        },
                    },
                    "responses": {
                        "200": {
                            "description": "reloaded",
                            "content": {
                                "application/json": {
                                    "schema": {
                                        "type": "object",
                                        "properties": {
                                            "status": {"type": "string"},
                                            "weights_version": {"type": "string"},
                                            "path": {"type": "string"},
                                            "models": {"type": "integer"},
                                            "clusters": {"type": "integer"},
                                            "workers": {
                                                "type": "integer",
                                                "description": "worker processes behind the port: with more than"
                                                " one, the file was validated and each process swaps it in on the"
                                                " signal that follows (each one's /health shows its version)",
                                            },
                                        },
                                    }
                                }
                            },
                        },
                        "400": error("invalid_request: the file was rejected; the previous weights keep serving"),
                        "408": error("request_timeout: the body did not arrive within the configured time"),
                        "409": error("conflict: with several worker processes only the configured file reloads"),
                        "413": error("invalid_request: body over the configured limit"),
                        "415": unsupported_media_type(),
                        "503": error("router_not_ready", retry_after=True),
                        **_reload_401(admin_token),
                    },
                }
            },
            **common_paths(),
        },
        "components": {
            "schemas": {
                "RouteRequest": route_request,
                "RouteResponse": _ROUTE_RESPONSE,
                "Error": ERROR_SCHEMA,
            },
            **({"securitySchemes": {"adminToken": _ADMIN_TOKEN}} if admin_token else {}),
        },
    }

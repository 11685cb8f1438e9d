"""POST /v1/route: request parsing and validation, and the response body; the GET /v1/models listing.

Validation here needs no weights; checks against the serving weights (model names) happen in
``engine.RouteQuery.build``. Unknown fields are ignored, as most JSON APIs do.
"""

from __future__ import annotations

import array
import math
from typing import Any, NamedTuple

import numpy as np

from service.errors import InvalidRequest, PayloadTooLarge
from service.http.responses import parse_json_object
from service.router.model_card import EMBEDDING_DIM
from service.router.weights import MAX_COST_WEIGHT, RouterWeights


class RouteRequest(NamedTuple):  # immutable, and cheaper to make per request than a frozen dataclass
    prompt: str | None
    embedding: np.ndarray | None  # [dim] float32, unit norm
    available_models: list[str] | None
    cost_weight: float | None


def parse_route_request(body: bytes, *, max_prompt_chars: int, dim: int = EMBEDDING_DIM) -> RouteRequest:
    data = parse_json_object(body)
    prompt = _prompt(data.get("prompt"), max_prompt_chars)
    # JSON's true and false are its only tokens with a 't' or an 'f' outside strings (numbers have neither): a body
    # without either byte holds no boolean, and the embedding's numbers need no type check (a memchr, not 384 checks)
    embedding = _embedding(data.get("embedding"), dim, may_hold_booleans=b"t" in body or b"f" in body)
    if embedding is None:  # the prompt is what gets embedded (beside an embedding, any text is fine)
        if prompt is None:
            raise InvalidRequest("give a 'prompt' (string) or an 'embedding' (array of numbers)")
        if not prompt.strip(BLANK):
            raise InvalidRequest("'prompt' must not be empty or only whitespace")
    return RouteRequest(
        prompt=prompt,
        embedding=embedding,
        available_models=_available_models(data.get("available_models")),
        cost_weight=_cost_weight(data.get("cost_weight")),
    )


# What "only whitespace" means for a prompt: ECMA-262's \s (the regex dialect of the OpenAPI document's pattern) and
# what Python's str.strip removes besides (\x1c-\x1f, \x85): the engine strips a prompt before embedding it, as
# sentence-transformers does, so one of those alone embedded as "" (which is refused) while it was accepted.
WHITESPACE = (
    "\t\n\v\f\r \u00a0\u1680" + "".join(map(chr, range(0x2000, 0x200B))) + "\u2028\u2029\u202f\u205f\u3000\ufeff"
)
BLANK = WHITESPACE + "\x1c\x1d\x1e\x1f\x85"


def _prompt(value: Any, max_chars: int) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise InvalidRequest(f"'prompt' must be a string, got {_json_type(value)}")
    if len(value) > max_chars:
        raise PayloadTooLarge(f"'prompt' has {len(value)} characters; the limit is {max_chars}")
    return value


_ONLY_NUMBERS = "'embedding' must contain only numbers"
_NUMBER_TYPES = frozenset({int, float})  # what orjson gives for JSON numbers (never subclasses)
_SMALLEST_NORMAL = float(np.finfo(np.float64).tiny)


def _embedding(value: Any, dim: int, *, may_hold_booleans: bool = True) -> np.ndarray | None:
    if value is None:
        return None
    if not isinstance(value, list):
        raise InvalidRequest(f"'embedding' must be an array of {dim} numbers, got {_json_type(value)}")
    if len(value) != dim:
        raise InvalidRequest(f"'embedding' must have exactly {dim} numbers, got {len(value)}")
    try:
        # One C pass from JSON numbers to doubles that refuses anything else: a string (which np.asarray would read
        # as its number), null (NaN to np.asarray), an array or an object.
        vector = np.frombuffer(array.array("d", value), dtype=np.float64)
    except (TypeError, OverflowError):
        raise InvalidRequest(_ONLY_NUMBERS) from None
    # It reads booleans as 1 and 0 though; only where such a value is there are the types checked one by one.
    if (
        may_hold_booleans
        and ((vector == 0.0) | (vector == 1.0)).any()
        and not _NUMBER_TYPES.issuperset(map(type, value))
    ):
        raise InvalidRequest(_ONLY_NUMBERS)
    # vdot, unlike ``@`` and ``dot``, raises no floating-point warning (which np.errstate, 2.5 us, would silence):
    # huge or non-finite numbers give inf or NaN here and take the careful path below
    squared = float(np.vdot(vector, vector))
    # the common case in one pass: every number finite, no overflow, and no underflow (a subnormal sum has lost
    # precision: vectors of about 1e-161 came back off unit length by percents)
    if _SMALLEST_NORMAL <= squared < math.inf:
        return (vector / math.sqrt(squared)).astype(np.float32)
    if not np.isfinite(vector).all():
        raise InvalidRequest("'embedding' must contain only finite numbers")
    largest = float(np.max(np.abs(vector)))
    if largest == 0.0:
        raise InvalidRequest("'embedding' must not be all zeros")
    vector /= largest  # scale first so that squaring huge (or tiny) values cannot overflow (or underflow)
    return (vector / np.linalg.norm(vector)).astype(np.float32)


def _available_models(value: Any) -> list[str] | None:
    if value is None:
        return None
    if not isinstance(value, list):
        raise InvalidRequest(f"'available_models' must be an array of strings, got {_json_type(value)}")
    if not value:
        raise InvalidRequest("'available_models' must not be empty (omit it to consider every model)")
    if not all(isinstance(name, str) for name in value):
        raise InvalidRequest("'available_models' must contain only strings")
    if any(not name for name in value):
        raise InvalidRequest("'available_models' must not contain empty names")
    return list(dict.fromkeys(value))


def _cost_weight(value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidRequest(f"'cost_weight' must be a number, got {_json_type(value)}")
    weight = float(value) + 0.0  # -0.0 becomes 0.0: the answer echoes the weight used
    if not 0 <= weight <= MAX_COST_WEIGHT:  # NaN fails both comparisons
        raise InvalidRequest(f"'cost_weight' must be a number from 0 to {MAX_COST_WEIGHT:g}, got {value}")
    return weight


def _json_type(value: Any) -> str:
    names = {dict: "object", list: "array", str: "string", bool: "boolean", int: "number", float: "number"}
    return "null" if value is None else names.get(type(value), type(value).__name__)


class RouteDecision(NamedTuple):  # as RouteRequest (1.2 against 1.6 us to make)
    selected_model: str
    cluster_id: int
    expected_error: float
    cost_adjusted_score: float
    all_scores: dict[str, float]  # the default query's answers share one per cluster: never mutated
    cache_hit: bool
    routing_ms: float
    embedding_ms: float
    queue_ms: float
    cost_weight: float
    clusters: list[tuple[int, float]]  # nearest clusters with cosine similarity, best first
    weights_version: str

    def to_json(self) -> dict[str, Any]:
        return {
            "selected_model": self.selected_model,
            "cluster_id": self.cluster_id,
            "expected_error": self.expected_error,
            "cost_adjusted_score": self.cost_adjusted_score,
            "all_scores": self.all_scores,
            "cache_hit": self.cache_hit,
            "usage": {
                "routing_ms": round(self.routing_ms, 4),
                "embedding_ms": round(self.embedding_ms, 4),
                "queue_ms": round(self.queue_ms, 4),
            },
            "cost_weight": self.cost_weight,
            "clusters": [{"cluster_id": cid, "similarity": sim} for cid, sim in self.clusters],
            "weights_version": self.weights_version,
        }


def models_listing(weights: RouterWeights) -> dict[str, Any]:
    """``GET /v1/models``: the models the router picks from (the names ``available_models`` takes), in the OpenAI
    list shape, with each one's cost and its expected error across the clusters; list prices where the weights
    record them."""
    prices = weights.metadata.get("price_usd_per_1k", {})
    errors = np.asarray(weights.expected_error, dtype=np.float64)  # [models, clusters]
    data = []
    for i, name in enumerate(weights.models):
        row = errors[i]
        entry: dict[str, Any] = {
            "id": name,
            "object": "model",
            "cost_per_1k": float(weights.cost_per_1k[i]),
            "expected_error": {"min": float(row.min()), "mean": float(row.mean()), "max": float(row.max())},
        }
        if isinstance(prices, dict) and isinstance(prices.get(name), dict):
            entry["price_usd_per_1k"] = prices[name]
        data.append(entry)
    return {
        "object": "list",
        "data": data,
        "weights_version": weights.version,
        "default_cost_weight": weights.default_lambda,
        "clusters": weights.num_clusters,
        "cost_unit": weights.metadata.get("cost_unit", "cost_per_1k as fitted"),
    }

"""The issue's examples and error cases against the real server (real model, shipped weights)."""

from __future__ import annotations

import asyncio
import re

import httpx
import numpy as np
import pytest
from openapi_spec_validator import validate

from service.router.weights import default_weights_path, load_weights
from tests.e2e.conftest import Server

WEIGHTS = load_weights(default_weights_path())


def route(router: Server, payload: object) -> httpx.Response:
    return httpx.post(f"{router.url}/v1/route", json=payload, timeout=30)


def check_decision(body: dict, cost_weight: float, candidates: set[str]) -> None:
    """The answer follows argmin(error + lambda * cost) over the candidates on its cluster."""
    models = list(WEIGHTS.models)
    cluster = body["cluster_id"]
    assert 0 <= cluster < WEIGHTS.num_clusters
    expected = {
        m: float(WEIGHTS.expected_error[models.index(m), cluster]) + cost_weight * float(
            WEIGHTS.cost_per_1k[models.index(m)])
        for m in candidates
    }  # fmt: skip
    assert body["all_scores"] == pytest.approx(expected)
    best = min(expected.values())
    tied = [m for m in candidates if expected[m] == pytest.approx(best)]
    cheapest = min(tied, key=lambda m: (float(WEIGHTS.cost_per_1k[models.index(m)]), m))
    assert body["selected_model"] == cheapest
    assert body["cost_adjusted_score"] == pytest.approx(best)
    assert body["expected_error"] == pytest.approx(float(WEIGHTS.expected_error[models.index(cheapest), cluster]))


def test_issue_example_prompt_with_cost_weight(router: Server) -> None:
    r = route(router, {"prompt": "Classify this ticket: billing | technical | other", "cost_weight": 0.7})
    assert r.status_code == 200
    body = r.json()
    for field in ("selected_model", "cluster_id", "expected_error", "cost_adjusted_score", "all_scores", "cache_hit"):
        assert field in body
    assert set(body["usage"]) >= {"routing_ms", "embedding_ms"}
    assert body["usage"]["embedding_ms"] > 0
    check_decision(body, 0.7, set(WEIGHTS.models))


def test_seed_example_with_available_models(router: Server) -> None:
    subset = [WEIGHTS.models[0], WEIGHTS.models[5], WEIGHTS.models[-1]]
    r = route(router, {"prompt": "Prove the square root of 2 is irrational.", "cost_weight": 0.5,
                       "available_models": subset})  # fmt: skip
    assert r.status_code == 200
    assert set(r.json()["all_scores"]) == set(subset)
    check_decision(r.json(), 0.5, set(subset))


def test_default_cost_weight_comes_from_the_weights(router: Server) -> None:
    body = route(router, {"prompt": "Write a function to reverse a linked list in Python."}).json()
    assert body["cost_weight"] == WEIGHTS.default_lambda
    check_decision(body, WEIGHTS.default_lambda, set(WEIGHTS.models))


def test_precomputed_embedding_skips_the_embedder_and_agrees_with_the_prompt(router: Server) -> None:
    from sentence_transformers import SentenceTransformer

    from service.router.model_card import default_model_dir

    prompt = "Which gas do plants absorb from the air for photosynthesis?"
    st = SentenceTransformer(str(default_model_dir()), device="cpu")
    embedding = st.encode([prompt])[0].tolist()
    by_prompt = route(router, {"prompt": prompt, "cost_weight": 0.2}).json()
    by_embedding = route(router, {"embedding": embedding, "cost_weight": 0.2}).json()
    assert by_embedding["usage"]["embedding_ms"] == 0
    assert by_embedding["cluster_id"] == by_prompt["cluster_id"]
    assert by_embedding["selected_model"] == by_prompt["selected_model"]
    # The server embeds in bf16 by default where the CPU has bf16 dot products (8 mantissa bits), else in fp32.
    dtype = httpx.get(f"{router.url}/health", timeout=30).json()["encoder"]["dtype"]
    tolerance = 1e-4 if dtype == "float32" else 5e-3  # bf16 (or fp16 when asked for): cosine >= 0.999
    similarity = by_prompt["clusters"][0]["similarity"]
    assert by_embedding["clusters"][0]["similarity"] == pytest.approx(similarity, abs=tolerance)


def test_repeated_prompt_is_a_cache_hit(router: Server) -> None:
    prompt = "What is the capital of Australia? (cache test)"
    first = route(router, {"prompt": prompt}).json()
    second = route(router, {"prompt": prompt, "cost_weight": 0.0}).json()
    assert (first["cache_hit"], second["cache_hit"]) == (False, True)
    assert second["cluster_id"] == first["cluster_id"]
    assert second["usage"]["embedding_ms"] == 0
    check_decision(second, 0.0, set(WEIGHTS.models))


@pytest.mark.parametrize(
    ("body", "status", "fragment"),
    [
        (b"{not json", 400, "not valid JSON"),
        (b"{}", 400, "give a 'prompt'"),
        (b'{"prompt": 42}', 400, "'prompt' must be a string"),
        (b'{"prompt": ""}', 400, "must not be empty"),
        (b'{"embedding": [0.1, 0.2]}', 400, "exactly 384"),
        (b'{"embedding": "0.1"}', 400, "must be an array"),
        (b'{"embedding": [0' + b", 0.0" * 383 + b"]}", 400, "must not be all zeros"),
        (b'{"prompt": " \\t\\n"}', 400, "only whitespace"),
        (b'{"embedding": [NaN' + b", 0.1" * 383 + b"]}", 400, "not valid JSON"),
        (b'{"embedding": [1e999' + b", 0.1" * 383 + b"]}", 400, "not valid JSON"),
        (b'{"prompt": "x", "available_models": []}', 400, "must not be empty"),
        (b'{"prompt": "x", "available_models": [""]}', 400, "empty names"),
        (b'{"prompt": "x", "available_models": ["gpt-9", "claude-v9"]}', 400, "'gpt-9', 'claude-v9'"),
        (b'{"prompt": "x", "cost_weight": -1}', 400, "from 0 to 1e+09"),
        (b'{"prompt": "x", "cost_weight": "0.5"}', 400, "must be a number"),
        (b'{"prompt": "x", "cost_weight": NaN}', 400, "not valid JSON"),
        (b'{"prompt": "' + b"x" * 40_000 + b'"}', 413, "limit is 32768"),
    ],
)
def test_error_cases(router: Server, body: bytes, status: int, fragment: str) -> None:
    r = httpx.post(f"{router.url}/v1/route", content=body, headers={"content-type": "application/json"}, timeout=30)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["code"] == "invalid_request"
    assert fragment in error["message"]


def test_huge_but_finite_embedding_is_a_direction(router: Server) -> None:
    r = route(router, {"embedding": [1e308] + [0.0] * 383})  # its squared norm would overflow a float
    assert r.status_code == 200


def test_wrong_content_type_method_and_path(router: Server) -> None:
    r = httpx.post(f"{router.url}/v1/route", content=b"prompt=x",
                   headers={"content-type": "application/x-www-form-urlencoded"})  # fmt: skip
    assert (r.status_code, r.json()["error"]["code"]) == (415, "invalid_request")
    r = httpx.get(f"{router.url}/v1/route")
    assert (r.status_code, r.json()["error"]["code"]) == (405, "method_not_allowed")
    r = httpx.get(f"{router.url}/v2/nothing")
    assert (r.status_code, r.json()["error"]["code"]) == (404, "not_found")
    r = httpx.post(f"{router.url}/v1/route/", json={"prompt": "x"}, headers={"host": "elsewhere.example"})
    assert (r.status_code, r.json()["error"]["code"]) == (404, "not_found")  # not a 307 to http://elsewhere.example
    assert "location" not in r.headers and "did you mean /v1/route?" in r.json()["error"]["message"]


def test_answers_before_the_body_is_read_close_the_connection(router: Server) -> None:
    """A 415, or a 413 judged on Content-Length, leaves the body unread, so the server cannot take another request
    on that connection: the answer says ``Connection: close`` and a keep-alive client goes on on a new one."""
    with httpx.Client(base_url=router.url) as client:
        assert client.post("/v1/route", json={"embedding": [0.05] * 384}).headers.get("connection") != "close"
        wrong_type = client.post("/v1/route", content=b"prompt=x",
                                 headers={"content-type": "application/x-www-form-urlencoded"})  # fmt: skip
        assert (wrong_type.status_code, wrong_type.headers["connection"]) == (415, "close")
        too_big = client.post("/v1/route", content=b"x" * (2 << 20), headers={"content-type": "application/json"})
        assert (too_big.status_code, too_big.headers["connection"]) == (413, "close")
        assert client.post("/v1/route", json={"embedding": [0.05] * 384}).status_code == 200


def test_health(router: Server) -> None:
    r = httpx.get(f"{router.url}/health")
    assert r.status_code == 200
    body = r.json()
    assert body["status"] == "ok"
    assert body["device"] == "cpu"
    assert body["models"] == 11
    assert body["clusters"] == 100
    assert body["weights_version"] == WEIGHTS.version
    assert body["embedder"] == "sentence-transformers/all-MiniLM-L6-v2"


def test_models_lists_the_shipped_weights_models_with_their_prices(router: Server) -> None:
    body = httpx.get(f"{router.url}/v1/models").json()
    assert (body["weights_version"], body["clusters"]) == (WEIGHTS.version, 100)
    assert [m["id"] for m in body["data"]] == list(WEIGHTS.models)
    scores = httpx.post(f"{router.url}/v1/route", json={"prompt": "what is 2 + 2?"}).json()["all_scores"]
    assert {m["id"] for m in body["data"]} == set(scores)  # the names the route scores and available_models takes
    for model, cost in zip(body["data"], WEIGHTS.cost_per_1k, strict=True):
        assert model["cost_per_1k"] == float(cost)
        assert 0 <= model["expected_error"]["min"] <= model["expected_error"]["mean"] <= model["expected_error"]["max"]
        assert set(model["price_usd_per_1k"]) == {"blended", "input", "output"}  # recorded by `fit`


async def test_200_concurrent_requests_are_all_answered_in_batches(router: Server) -> None:
    before = _batch_stats(router)
    prompts = [f"Concurrent question number {i}: how do magnets work in motor {i * 7}?" for i in range(200)]
    limits = httpx.Limits(max_connections=200, max_keepalive_connections=200)
    async with httpx.AsyncClient(base_url=router.url, limits=limits, timeout=120) as client:
        responses = await asyncio.gather(*(client.post("/v1/route", json={"prompt": p}) for p in prompts))
    assert [r.status_code for r in responses] == [200] * 200
    assert all(r.json()["selected_model"] in WEIGHTS.models for r in responses)
    after = _batch_stats(router)
    batches, prompts_computed = after[0] - before[0], after[1] - before[1]
    assert prompts_computed == 200
    assert prompts_computed / batches > 1  # batched, not one by one
    assert after[2] > 1  # the largest batch had more than one prompt


def _batch_stats(router: Server) -> tuple[float, float, int]:
    text = httpx.get(f"{router.url}/metrics").text
    count = float(re.search(r"^router_batch_size_count ([0-9.e+]+)$", text, re.M).group(1))
    total = float(re.search(r"^router_batch_size_sum ([0-9.e+]+)$", text, re.M).group(1))
    # smallest bucket bound that already holds every batch
    buckets = re.findall(r'^router_batch_size_bucket\{le="([0-9.+Inf]+)"\} ([0-9.e+]+)$', text, re.M)
    largest = next(float(le) for le, n in buckets if float(n) == count)
    return count, total, int(largest) if np.isfinite(largest) else 10**9


def test_metrics_and_openapi(router: Server) -> None:
    metrics = httpx.get(f"{router.url}/metrics")
    assert metrics.status_code == 200
    assert metrics.headers["content-type"].startswith("text/plain")
    for family in ("router_http_requests_total", "router_http_request_duration_seconds", "router_queue_wait_seconds",
                   "router_embedding_duration_seconds", "router_routing_duration_seconds", "router_batch_size",
                   "router_batch_tokens", "router_queue_depth", "router_cache_hits_total", "router_cache_misses_total",
                   "router_selections_total", "router_cluster_requests_total"):  # fmt: skip
        assert f"\n{family}" in metrics.text, family
    spec = httpx.get(f"{router.url}/openapi.json").json()
    validate(spec)
    assert "/v1/route" in spec["paths"]

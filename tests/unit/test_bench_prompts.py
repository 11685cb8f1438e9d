"""Scenario bodies: exact prompt lengths by the real MiniLM tokenizer, uniqueness, seeding, embeddings."""

from __future__ import annotations

import random
import statistics

import numpy as np
import orjson
import pytest

from benchmarks.harness import prompts, scenarios
from benchmarks.harness.scenarios import Workload
from benchmarks.harness.systems import Running


def test_exact_length_prompt_has_exactly_that_many_tokens() -> None:
    rng = random.Random(0)
    for target in range(prompts.MIN_TOKENS, prompts.MAX_TOKENS + 1):
        for uid in (0, 356, 987_654_321):
            assert prompts.token_count(prompts.exact_length_prompt(target, uid, rng)) == target


def test_ids_make_texts_distinct_even_at_the_shortest_length() -> None:
    rng = random.Random(0)
    texts = {prompts.exact_length_prompt(prompts.MIN_TOKENS, uid, rng) for uid in range(0, 10**9, 10**9 // 5000)}
    assert len(texts) == 5000
    with pytest.raises(ValueError):
        prompts.exact_length_prompt(prompts.MIN_TOKENS - 1, 0, rng)


def test_mixed_lengths_span_8_to_300_tokens_log_uniformly() -> None:
    texts = prompts.mixed_length_prompts(600, seed=0)
    counts = [prompts.token_count(t) for t in texts]
    assert min(counts) >= prompts.MIN_TOKENS and max(counts) <= prompts.MAX_TOKENS
    assert min(counts) < 12 and max(counts) > 250  # the whole range is used
    assert 35 < statistics.median(counts) < 65  # log-uniform: median near sqrt(8 * 300) = 49
    assert sum(c > 256 for c in counts) > 0  # some go past the model's 256-token cut
    assert len(set(texts)) == len(texts)


def test_prompt_sets_are_seeded_and_disjoint_across_points() -> None:
    assert prompts.mixed_length_prompts(20, seed=3) == prompts.mixed_length_prompts(20, seed=3)
    assert prompts.mixed_length_prompts(20, seed=3) != prompts.mixed_length_prompts(20, seed=4)
    running = Running("router", "http://x/v1/route", {}, lambda p: orjson.dumps({"prompt": p}))
    unique = Workload("router", scenarios.UNIQUE)
    first = scenarios.bodies(unique, running, 2000, seed=0, point=0)
    second = scenarios.bodies(unique, running, 2000, seed=0, point=1)
    assert len(set(first)) == 2000 and not set(first) & set(second)
    repeated = scenarios.bodies(Workload("router", scenarios.REPEATED), running, 10**6, seed=0, point=5)
    assert len(repeated) == scenarios.REPEATED_PROMPTS
    assert repeated == scenarios.bodies(Workload("router", scenarios.REPEATED), running, 1, seed=0, point=0)


def test_embedding_bodies_are_unit_vectors_of_the_embedder_width() -> None:
    bodies = prompts.embedding_bodies(50, seed=0)
    vectors = np.array([orjson.loads(b)["embedding"] for b in bodies])
    assert vectors.shape == (50, prompts.EMBEDDING_DIM)
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-4)
    assert len({b for b in bodies}) == 50


def test_bodies_file_is_one_json_document_a_line(tmp_path) -> None:  # type: ignore[no-untyped-def]
    path = prompts.write_bodies(tmp_path / "b.jsonl", prompts.prompt_bodies(['a "quoted" line', "two\nlines"]))
    lines = path.read_bytes().splitlines()
    assert [orjson.loads(x)["prompt"] for x in lines] == ['a "quoted" line', "two\nlines"]

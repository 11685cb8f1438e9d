from __future__ import annotations

import numpy as np

from service.router.scoring import ScoreTable, score_batch, score_one, verdict

MODELS = ("gpt-4o", "gpt-4o-mini", "ministral-3b")
ERROR = np.array([[0.01, 0.30], [0.04, 0.30], [0.18, 0.30]])  # [M, K]
COST = np.array([0.5, 0.05, 0.005])


def table() -> ScoreTable:
    return ScoreTable.build(MODELS, ERROR, COST)


def test_table_orders_models_by_cost_then_name() -> None:
    assert table().models == ("ministral-3b", "gpt-4o-mini", "gpt-4o")
    tied = ScoreTable.build(("b", "a", "c"), np.zeros((3, 1)), np.array([1.0, 1.0, 0.5]))
    assert tied.models == ("c", "a", "b")


def test_score_is_error_plus_lambda_times_cost() -> None:
    t = table()
    sel = score_batch(t, np.array([0]), np.array([0.1]), np.ones((1, 3), dtype=bool))
    by_name = dict(zip(t.models, sel.all_scores[0], strict=True))
    assert by_name["gpt-4o"] == 0.01 + 0.1 * 0.5
    assert by_name["gpt-4o-mini"] == 0.04 + 0.1 * 0.05
    assert by_name["ministral-3b"] == 0.18 + 0.1 * 0.005
    assert t.models[sel.chosen[0]] == "gpt-4o-mini"  # 0.045 < 0.06 < 0.1805
    assert sel.score[0] == by_name["gpt-4o-mini"]
    assert sel.expected_error[0] == 0.04


def test_lambda_zero_is_quality_first_and_large_lambda_cheap_first() -> None:
    t = table()
    sel = score_batch(t, np.array([0, 0]), np.array([0.0, 5.0]), np.ones((2, 3), dtype=bool))
    assert [t.models[i] for i in sel.chosen] == ["gpt-4o", "ministral-3b"]


def test_ties_go_to_the_cheaper_model() -> None:
    t = table()
    sel = score_batch(t, np.array([1]), np.array([0.0]), np.ones((1, 3), dtype=bool))  # all error 0.30
    assert t.models[sel.chosen[0]] == "ministral-3b"


def test_allowed_mask_excludes_models_with_inf_score() -> None:
    t = table()
    allowed = np.array([[False, True, True]])  # ministral excluded
    sel = score_batch(t, np.array([1]), np.array([0.0]), allowed)
    assert t.models[sel.chosen[0]] == "gpt-4o-mini"
    assert np.isinf(sel.all_scores[0, 0])


def test_batch_equals_one_by_one() -> None:
    rng = np.random.default_rng(0)
    t = ScoreTable.build(tuple(f"m{i}" for i in range(5)), rng.uniform(size=(5, 7)), rng.uniform(size=5))
    clusters = rng.integers(0, 7, size=50)
    lambdas = rng.uniform(0, 2, size=50)
    allowed = rng.uniform(size=(50, 5)) < 0.7
    allowed[:, 0] = True
    batch = score_batch(t, clusters, lambdas, allowed)
    for i in range(50):
        one = score_batch(t, clusters[i : i + 1], lambdas[i : i + 1], allowed[i : i + 1])
        assert one.chosen[0] == batch.chosen[i]
        np.testing.assert_array_equal(one.all_scores[0], batch.all_scores[i])
        expected = t.error_by_cluster[clusters[i]] + lambdas[i] * t.cost
        best = min(j for j in range(5) if allowed[i, j] and expected[j] == min(expected[allowed[i]]))
        assert batch.chosen[i] == best


def test_score_one_agrees_with_score_batch_bit_for_bit() -> None:
    """The on-the-spot path (cache hits, supplied embeddings) and the batch path must never disagree: random
    tables with deliberate ties (errors and costs from small grids), random lambdas and candidate subsets."""
    rng = np.random.default_rng(7)
    for _ in range(300):
        num_models, num_clusters = int(rng.integers(1, 12)), int(rng.integers(1, 6))
        table_ = ScoreTable.build(
            tuple(f"m{i}" for i in range(num_models)),
            rng.choice([0.0, 0.1, 0.2, 0.30000000000000004, 1 / 3], size=(num_models, num_clusters)),
            rng.choice([0.0, 0.005, 0.05, 0.1, 0.5], size=num_models),
        )
        cluster = int(rng.integers(num_clusters))
        lam = float(rng.choice([0.0, 0.1, 1.0, 2.0, float(rng.random()), 1e6]))
        columns = tuple(sorted(rng.choice(num_models, size=int(rng.integers(1, num_models + 1)), replace=False)))
        mask = np.zeros((1, num_models), dtype=bool)
        mask[0, list(columns)] = True
        batch = score_batch(table_, np.array([cluster]), np.array([lam]), mask)
        best, scores = score_one(table_, cluster, lam, columns)
        assert columns[best] == int(batch.chosen[0])
        assert scores[best] == float(batch.score[0])
        assert scores == [float(batch.all_scores[0, m]) for m in columns]
        assert table_.error_rows[cluster][columns[best]] == float(batch.expected_error[0])
        named = verdict(table_, cluster, lam, columns)
        assert named.selected == table_.models[int(batch.chosen[0])]
        assert (named.expected_error, named.score) == (float(batch.expected_error[0]), float(batch.score[0]))
        assert list(named.all_scores) == [table_.models[m] for m in columns]
        assert list(named.all_scores.values()) == scores

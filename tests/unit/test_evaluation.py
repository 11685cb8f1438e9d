"""Deferral-curve metrics and baselines on cases small enough to compute on paper."""

from __future__ import annotations

import math

import numpy as np
import pytest

from service.router.offline import evaluation as ev
from service.router.offline.baselines import (
    ORACLE,
    RANDOM_MIX,
    SINGLE_ENVELOPE,
    Outcomes,
    baseline_curves,
    observed_rows,
    system_curve,
)
from service.router.scoring import ScoreTable, score_batch

# --- the envelope ------------------------------------------------------------------------------

# (0.2, 0.55) lies under the chord (0.1, 0.5) -> (0.5, 0.8); (0.6, 0.7) costs more than (0.5, 0.8) for less.
POINTS_COST = np.array([0.5, 0.1, 0.2, 0.6, 1.0])
POINTS_ACC = np.array([0.8, 0.5, 0.55, 0.7, 0.9])
HULL = ([0.1, 0.5, 1.0], [0.5, 0.8, 0.9])


def test_upper_envelope_keeps_the_concave_non_decreasing_hull() -> None:
    hx, hy = ev.upper_envelope(POINTS_COST, POINTS_ACC)
    np.testing.assert_allclose(hx, HULL[0])
    np.testing.assert_allclose(hy, HULL[1])


def test_upper_envelope_stops_at_the_cheapest_most_accurate_point() -> None:
    # Equal costs keep the more accurate; equal best accuracy keeps the cheaper.
    hx, hy = ev.upper_envelope(np.array([0.2, 0.2, 0.4, 0.9]), np.array([0.3, 0.6, 0.9, 0.9]))
    np.testing.assert_allclose(hx, [0.2, 0.4])
    np.testing.assert_allclose(hy, [0.6, 0.9])
    with pytest.raises(ValueError, match="non-empty"):
        ev.upper_envelope(np.array([]), np.array([]))


def test_audc_of_a_line_from_half_to_one_is_three_quarters() -> None:
    # Curve 0.5 + 0.5 x on [0, 1]: the 1001 grid points average to 0.5 + 0.5 * 0.5.
    assert ev.audc(np.array([0.0, 1.0]), np.array([0.5, 1.0])) == pytest.approx(0.75)


def test_audc_of_one_point_counts_zero_left_of_it() -> None:
    # Grid points 500..1000 (501 of 1001) see 0.8; the 500 before it see 0.
    assert ev.audc(np.array([0.5]), np.array([0.8])) == pytest.approx(0.8 * 501 / 1001)


def test_audc_of_the_three_vertex_hull() -> None:
    # j = 100..500: 0.5 + 0.75 (x - 0.1), sum = 200.5 + 0.75 * (120.3 - 40.1) = 260.65;
    # j = 501..1000: 0.8 + 0.2 (x - 0.5), sum = 400 + 0.2 * (375.25 - 250) = 425.05.
    assert ev.audc(np.array(HULL[0]), np.array(HULL[1])) == pytest.approx((260.65 + 425.05) / 1001)


@pytest.mark.parametrize(
    ("target", "expected"),
    [(0.85, 0.5 + 0.5 * 0.05 / 0.1), (0.8, 0.5), (0.4, 0.1), (0.5, 0.1), (0.9, 1.0), (0.95, math.inf)],
)
def test_qnc_interpolates_on_the_hull(target: float, expected: float) -> None:
    assert ev.qnc(np.array(HULL[0]), np.array(HULL[1]), target) == pytest.approx(expected)


def test_accuracy_at_budgets() -> None:
    curve = ev.curve_from_points(POINTS_COST, POINTS_ACC)
    metrics = ev.curve_metrics(curve, target=0.85, budgets=(0.05, 0.3, 0.5, 2.0))
    assert metrics.accuracy_at == pytest.approx({0.05: 0.0, 0.3: 0.5 + 0.75 * 0.2, 0.5: 0.8, 2.0: 0.9})
    assert metrics.qnc == pytest.approx(0.75)
    assert metrics.max_accuracy == pytest.approx(0.9)
    assert metrics.as_dict()["acc@0.3"] == pytest.approx(0.65)
    assert ev.curve_metrics(curve, target=0.95).as_dict()["qnc"] is None


# --- routing and the lambda sweep --------------------------------------------------------------


def test_choices_break_ties_by_cost_then_index() -> None:
    error = np.array([[0.3, 0.2, 0.2], [0.5, 0.5, 0.5]])
    cost = np.array([0.0, 0.5, 0.5])
    chosen = ev.chosen_columns(error, cost, np.array([0.2, 0.0]))
    # Row 0 at lambda 0.2: scores 0.3, 0.3, 0.3 -> the cheapest (column 0). Row 1: all 0.5 + ... -> column 0.
    np.testing.assert_array_equal(chosen[0], [0, 0])
    # At lambda 0: row 0 ties columns 1 and 2 (same cost) -> the lower index.
    np.testing.assert_array_equal(chosen[1], [1, 0])


def test_choices_match_the_service_scoring() -> None:
    rng = np.random.default_rng(0)
    models = ("a", "b", "c", "d")  # as weights keep them: sorted by name
    error = np.round(rng.uniform(size=(4, 6)), 1).astype(np.float32)  # [M, K], rounded to make ties
    error[3] = error[1]  # b and d: equal errors and equal costs, so only the tie rule separates them
    cost = np.array([0.2, 0.1, 1.0, 0.1], dtype=np.float32)
    table = ScoreTable.build(models, error, cost)
    clusters = np.arange(6)
    lambdas = np.array([0.0, 0.1, 0.5, 3.0])
    ours = ev.chosen_columns(error.T.astype(np.float64)[clusters], cost.astype(np.float64), lambdas)
    for lam, chosen in zip(lambdas, ours, strict=True):
        served = score_batch(table, clusters, np.full(6, lam), np.ones((6, 4), dtype=bool))
        assert [table.models[c] for c in served.chosen] == [models[c] for c in chosen]


def test_lambda_breakpoints_visit_every_policy() -> None:
    # cheap: error 0.5, cost 0.1; dear: error 0.2, cost 1.0 -> switch at (0.5 - 0.2) / (1.0 - 0.1) = 1/3.
    error = np.array([[0.5, 0.2]])
    cost = np.array([0.1, 1.0])
    lambdas = ev.lambda_breakpoints(error, cost)
    np.testing.assert_allclose(lambdas, [0.0, 1 / 3, 1 / 3], rtol=1e-8)  # each breakpoint, and just above it
    assert ev.chosen_columns(error, cost, lambdas).tolist() == [[1], [0], [0]]  # at the breakpoint the cheaper wins


def test_lambda_breakpoints_visit_the_policy_above_a_breakpoint_float_rounding_hides() -> None:
    """At the computed breakpoint 0.83 / 0.55 the two scores differ in their last bit, so the dearer model still wins
    there; the cheap policy above it was never evaluated."""
    error = np.array([[0.86, 0.03]])
    cost = np.array([0.18, 0.73])
    lambdas = ev.lambda_breakpoints(error, cost)
    assert ev.chosen_columns(error, cost, lambdas[lambdas > 0][:1]).tolist() == [[1]]  # the rounding, as found
    assert ev.chosen_columns(error, cost, lambdas)[:, 0].tolist() == [1, 1, 0]


def test_lambda_breakpoints_are_thinned_to_the_cap() -> None:
    rng = np.random.default_rng(1)
    lambdas = ev.lambda_breakpoints(rng.uniform(size=(200, 6)), rng.uniform(size=(200, 6)), max_lambdas=50)
    assert lambdas.size == 50
    assert lambdas[0] == 0.0
    assert np.all(np.diff(lambdas) > 0)


def test_routed_points_by_hand() -> None:
    error = np.array([[0.5, 0.2], [0.1, 0.4]])
    cost = np.array([0.1, 1.0])
    correct = np.array([[0.0, 1.0], [1.0, 0.0]])
    realised = np.array([[1.0, 10.0], [2.0, 20.0]])
    costs, accs = ev.routed_points(error, cost, correct, realised, [0.0, 1.0])
    # lambda 0: row 0 -> dear (10, right), row 1 -> cheap (2, right); lambda 1: both cheap (1 + 2, one right).
    np.testing.assert_allclose(costs, [6.0, 1.5])
    np.testing.assert_allclose(accs, [1.0, 0.5])


# --- baselines ---------------------------------------------------------------------------------

# cheap / mid / best cost 1 / 2 / 10 per prompt; accuracies 0.25 / 0.5 / 0.75; p3 nobody gets right.
TOY = Outcomes(
    models=("cheap", "mid", "best"),
    correct=np.array([[1.0, 1.0, 1.0], [0.0, 1.0, 1.0], [0.0, 0.0, 1.0], [0.0, 0.0, 0.0]]),
    cost=np.tile([1.0, 2.0, 10.0], (4, 1)),
)


def test_outcomes_reference_and_cheapest() -> None:
    assert TOY.reference == 2
    assert TOY.cheapest == 0
    assert TOY.reference_cost == 10.0
    assert TOY.target_accuracy == 0.75
    tied = Outcomes(("a", "b"), np.array([[1.0, 1.0], [0.0, 0.0]]), np.array([[2.0, 1.0], [2.0, 1.0]]))
    assert tied.reference == 1  # equally accurate: the cheaper
    with pytest.raises(ValueError, match="observed"):
        Outcomes(("a",), np.array([[np.nan]]), np.array([[1.0]]))


def test_oracle_curve_by_hand() -> None:
    curve = baseline_curves(TOY)[ORACLE]
    # lambda 0: p0 cheap, p1 mid, p2 best, p3 (nobody right) cheap -> cost 14 / 4 / 10, accuracy 0.75;
    # lambda 1/9: p2 falls to cheap -> cost 5 / 40; lambda 1: p1 falls to cheap -> cost 0.1, accuracy 0.25.
    np.testing.assert_allclose(curve.hull_cost, [0.1, 0.125, 0.35])
    np.testing.assert_allclose(curve.hull_accuracy, [0.25, 0.5, 0.75])
    assert ev.qnc(curve.hull_cost, curve.hull_accuracy, TOY.target_accuracy) == pytest.approx(0.35)


def test_random_mix_audc_by_hand() -> None:
    curve = baseline_curves(TOY)[RANDOM_MIX]
    # 0.25 + (0.5 / 0.9)(x - 0.1) on j = 100..1000: 901 * 0.25 + (5/9) * (495.55 - 90.1) = 450.5.
    assert ev.audc(curve.hull_cost, curve.hull_accuracy) == pytest.approx(450.5 / 1001)


def test_single_models_and_their_envelope() -> None:
    curves = baseline_curves(TOY)
    assert list(curves) == [ORACLE, RANDOM_MIX, SINGLE_ENVELOPE, "cheap", "mid", "best"]
    np.testing.assert_allclose(curves[SINGLE_ENVELOPE].hull_cost, [0.1, 0.2, 1.0])
    best = ev.curve_metrics(curves["best"], TOY.target_accuracy)
    assert best.qnc == pytest.approx(1.0)
    assert best.audc == pytest.approx(0.75 / 1001)  # only the grid point x = 1 reaches it
    assert math.isinf(ev.curve_metrics(curves["mid"], TOY.target_accuracy).qnc)


@pytest.mark.parametrize("rows", [3, 10, 14, 40])
def test_a_model_at_exactly_a_budget_counts_there_whatever_the_float_noise(rows: int) -> None:
    # "cheap" costs exactly a tenth of "best" on every row, but mean(0.01) / mean(0.001) over 10, 14 or 40
    # rows is 0.1 + a few ulp: acc@10% used to be 0 there (and the AUDC lost its grid point x = 0.1).
    correct = np.zeros((rows, 2))
    correct[:, 1] = 1.0
    correct[::2, 0] = 1.0
    outcomes = Outcomes(("cheap", "best"), correct, np.tile([0.001, 0.01], (rows, 1)))
    accuracy = outcomes.accuracy[0]
    metrics = ev.curve_metrics(baseline_curves(outcomes)["cheap"], outcomes.target_accuracy)
    assert metrics.accuracy_at[0.1] == pytest.approx(accuracy)
    assert metrics.accuracy_at[0.05] == 0.0
    assert metrics.audc == pytest.approx(901 * accuracy / 1001)  # grid points x = 0.1, ..., 1


def test_system_curve_of_a_perfect_router_equals_the_oracle() -> None:
    expected = 1.0 - TOY.correct
    mine = system_curve(TOY, expected, TOY.cost)
    oracle = baseline_curves(TOY)[ORACLE]
    np.testing.assert_allclose(mine.hull_cost, oracle.hull_cost)
    with pytest.raises(ValueError, match="expected_error must be"):
        system_curve(TOY, expected[:2], TOY.cost)


def test_observed_rows_drop_missing_outcomes_and_costs() -> None:
    correct = np.array([[1.0, np.nan], [1.0, 0.0], [0.0, 1.0]])
    cost = np.array([[1.0, 1.0], [1.0, 1.0], [np.nan, 1.0]])
    assert observed_rows(correct, cost).tolist() == [False, True, False]

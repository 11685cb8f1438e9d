"""Per-cluster error estimates: shrinkage on tiny clusters, the task-mix prior, choosing alpha."""

from __future__ import annotations

import numpy as np
import pytest

from service.router.offline import estimate


def test_tiny_cluster_stays_near_the_prior_large_cluster_near_its_rate() -> None:
    # One model, global error g = 51 / 102 = 0.5: cluster 0 has 100 rows, 50 wrong; cluster 1 one wrong row;
    # cluster 2 one right row.
    assign = np.array([0] * 100 + [1, 2])
    correct = np.array([[1.0]] * 50 + [[0.0]] * 50 + [[0.0], [1.0]])
    error = estimate.cluster_error(assign, correct, k=3, alpha=8.0)
    assert error[0, 0] == pytest.approx((50 + 8 * 0.5) / (100 + 8))  # 0.5
    assert error[0, 1] == pytest.approx((1 + 8 * 0.5) / (1 + 8))  # 5/9, not 100 %
    assert error[0, 2] == pytest.approx((0 + 8 * 0.5) / (1 + 8))  # 4/9, not 0 %
    raw = estimate.cluster_error(assign, correct, k=3, alpha=0.0)
    np.testing.assert_allclose(raw[0], [0.5, 1.0, 0.0])


def test_task_rates_shrink_small_tasks_toward_the_global_rate() -> None:
    # Task 0: 4 rows, 1 wrong; task 1: 2 rows, both wrong -> g = 3/6; task 2 has no rows.
    tasks = np.array([0, 0, 0, 0, 1, 1])
    correct = np.array([[1.0], [1.0], [1.0], [0.0], [0.0], [0.0]])
    rates = estimate.task_rates(tasks, correct, num_tasks=3, strength=2.0)
    np.testing.assert_allclose(rates[:, 0], [(1 + 2 * 0.5) / (4 + 2), (2 + 2 * 0.5) / (2 + 2), 0.5])


def test_task_mix_prior_by_hand() -> None:
    # Cluster 0: 3 rows of task A, 1 of task B; cluster 1: only B; cluster 2: empty.
    counts = np.array([[3.0, 1.0], [0.0, 2.0], [0.0, 0.0]])
    rates = np.array([[0.1, 0.6], [0.5, 0.2]])  # [T, M]
    fallback = np.array([0.3, 0.4])
    prior = estimate.task_mix_prior(counts, rates, fallback)
    np.testing.assert_allclose(prior, [[0.75 * 0.1 + 0.25 * 0.5, 0.75 * 0.6 + 0.25 * 0.2], [0.5, 0.2], [0.3, 0.4]])


def test_cluster_error_with_the_task_prior() -> None:
    # Two tasks of 4 rows each: the model is always right on task 0, always wrong on task 1 (g = 0.5).
    assign = np.array([0, 0, 0, 1, 1, 1, 1, 2])
    tasks = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    correct = np.array([[1.0]] * 4 + [[0.0]] * 4)
    prior = estimate.fit_prior(assign, correct, 3, tasks, num_tasks=2)
    # Task rates with TASK_PRIOR_STRENGTH = s pseudo-rows at 0.5: r0 = 0.5 s / (4 + s), r1 = (4 + 0.5 s) / (4 + s).
    s = estimate.TASK_PRIOR_STRENGTH
    r0, r1 = 0.5 * s / (4 + s), (4 + 0.5 * s) / (4 + s)
    np.testing.assert_allclose(prior[:, 0], [r0, 0.25 * r0 + 0.75 * r1, r1])
    error = estimate.cluster_error(assign, correct, 3, alpha=2.0, prior=prior)
    # Cluster 2 holds one wrong row of task 1: (1 + 2 r1) / 3, pulled toward task 1's rate, not toward 0.5.
    assert error[0, 2] == pytest.approx((1 + 2 * r1) / 3)
    assert error[0, 0] == pytest.approx((0 + 2 * r0) / (3 + 2))
    global_prior = estimate.fit_prior(assign, correct, 3, None)
    np.testing.assert_allclose(global_prior, 0.5)
    with pytest.raises(ValueError, match="prior must be"):
        estimate.cluster_error(assign, correct, 3, alpha=2.0, prior=prior[:2])


def _two_model_clusters(n: int = 800, k: int = 8, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A cheap model right on even clusters only, a dear model right on 85 % of everything."""
    rng = np.random.default_rng(seed)
    assign = rng.integers(0, k, size=n)
    cheap = (rng.uniform(size=n) < np.where(assign % 2 == 0, 0.95, 0.05)).astype(float)
    dear = (rng.uniform(size=n) < 0.85).astype(float)
    return assign, np.stack([cheap, dear], axis=1), np.tile([0.05, 1.0], (n, 1))


def test_select_alpha_by_audc_trusts_the_task_prior_when_clusters_within_a_task_are_alike() -> None:
    # 100 clusters of ~6 rows, each of one task; the cheap model is right on 80 % of task 0 and 40 % of task 1
    # whatever the cluster, so per-cluster rates are noise around their task's rate.
    rng = np.random.default_rng(0)
    n, k = 600, 100
    assign = rng.integers(0, k, size=n)
    tasks = assign % 2
    cheap = (rng.uniform(size=n) < np.where(tasks == 0, 0.8, 0.4)).astype(float)
    dear = (rng.uniform(size=n) < 0.85).astype(float)
    costs = estimate.RoutingCosts(route=np.array([0.05, 1.0]), realised=np.tile([0.05, 1.0], (n, 1)))
    correct = np.stack([cheap, dear], axis=1)
    choice = estimate.select_alpha(assign, correct, k, task_ids=tasks, num_tasks=2, costs=costs)
    assert choice.criterion == "audc"
    assert choice.alpha >= 64.0
    assert len(choice.cv_score) == len(choice.grid)
    assert max(choice.cv_score) == choice.cv_score[choice.grid.index(choice.alpha)]
    assert max(choice.cv_score) > choice.cv_score[0] + 0.005  # alpha = 0.25 routes on noise
    assert choice.as_metadata()["criterion"] == "audc"
    assert estimate.select_alpha(assign, correct, k, task_ids=tasks, num_tasks=2, costs=costs) == choice


def test_held_out_audc_skips_rows_without_every_outcome() -> None:
    assign, correct, cost = _two_model_clusters(n=200)
    correct[:10, 0] = np.nan
    costs = estimate.RoutingCosts(route=np.array([0.05, 1.0]), realised=cost)
    error = estimate.cluster_error(assign, correct, 8, alpha=1.0)
    value = estimate.held_out_audc(error, assign, correct, costs, np.arange(200))
    assert value == pytest.approx(estimate.held_out_audc(error, assign, correct, costs, np.arange(10, 200)))


def _sparse_second_model(observed_rows: list[int], n: int = 40) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Model 0 observed everywhere, model 1 only on ``observed_rows``; two clusters; costs on every row."""
    assign = np.arange(n) % 2
    correct = np.stack([(np.arange(n) % 3 > 0), (np.arange(n) % 2 == 0)], axis=1).astype(np.float64)
    correct[[i for i in range(n) if i not in observed_rows], 1] = np.nan
    return assign, correct, np.tile([0.1, 1.0], (n, 1))


def test_select_alpha_leaves_out_folds_a_sparse_model_cannot_score() -> None:
    # Model 1 has outcomes on 10 rows only: fold 0's held-out rows have none of them, so no row there is observed
    # for every model. The AUDC criterion failed with "no prompts to evaluate on"; now that fold is left out.
    observed = list(range(10))
    assign, correct, cost = _sparse_second_model(observed)
    fold_of = estimate.fold_assignment(len(assign), estimate.DEFAULT_CV_FOLDS, seed=0)
    assert 0 not in set(fold_of[observed].tolist())  # the premise: fold 0 holds none of model 1's outcomes
    costs = estimate.RoutingCosts(route=np.array([0.1, 1.0]), realised=cost)
    choice = estimate.select_alpha(assign, correct, 2, costs=costs, seed=0)
    assert choice.alpha in estimate.DEFAULT_ALPHA_GRID
    assert f"{len(set(fold_of[observed]))} of the folds scorable" in choice.method
    assert all(np.isfinite(choice.cv_score))
    by_log_loss = estimate.select_alpha(assign, correct, 2, seed=0)  # every fold has some held-out outcome
    assert "scorable" not in by_log_loss.method


def test_select_alpha_says_so_when_no_fold_can_be_scored() -> None:
    # Model 1's only outcome: whichever fold holds it out trains without it, and no other fold can score AUDC.
    assign, correct, cost = _sparse_second_model([0])
    costs = estimate.RoutingCosts(route=np.array([0.1, 1.0]), realised=cost)
    with pytest.raises(ValueError, match=r"cannot choose alpha by 5-fold cross-validation.*give --alpha"):
        estimate.select_alpha(assign, correct, 2, costs=costs, seed=0)

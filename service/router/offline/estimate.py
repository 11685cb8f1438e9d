"""Per-cluster error estimates: shrinkage toward a prior, and the priors themselves.

For model ``m`` and cluster ``c``::

    error[m, c] = (wrong[m, c] + alpha * prior[c, m]) / (n[m, c] + alpha)

where ``wrong`` sums ``1 - correct`` and ``n`` counts the observed outcomes of the rows assigned to
``c`` (NaN outcomes are left out, per model). ``alpha`` acts as that many pseudo-observations at the
prior rate; a cluster with no observation of a model gets exactly the prior.

Two priors (a two-level hierarchy: prompt -> cluster -> task -> global):

- global: ``prior[c, m] = g[m]``, the model's error over all observed rows;
- task mix: ``prior[c, m] = sum_t share[c, t] * r[t, m]``, where ``share[c, t]`` is the fraction of
  cluster ``c``'s training rows that come from task ``t`` and ``r[t, m] = (wrong[t, m] + beta * g[m])
  / (n[t, m] + beta)`` is the model's error on task ``t``, itself shrunk toward ``g[m]``. Only the
  training rows need a task; a routed prompt just falls in a cluster. A cluster with no training
  rows gets ``g[m]``.

``alpha`` is chosen by cross-validation on the training rows (:func:`select_alpha`): the highest mean
AUDC of the held-out rows' routed deferral curves (the metric the router is judged by), or the lowest
log-loss of their outcomes under ``P(correct) = 1 - error``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from service.router.offline.baselines import Outcomes, observed_rows, system_curve
from service.router.offline.evaluation import audc
from service.router.offline.options import DEFAULT_SEED, Criterion

# Shrinkage strengths tried by cross-validation; the prior counts as this many pseudo-observations.
DEFAULT_ALPHA_GRID: tuple[float, ...] = (0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0)
DEFAULT_CV_FOLDS = 5
# Pseudo-observations pulling a task's error rate toward the model's global rate: negligible for the
# hundreds of rows a training task has, decisive for a task seen a handful of times (add-model).
TASK_PRIOR_STRENGTH = 8.0
# Keeps log-loss finite when a shrunk estimate is exactly 0 or 1 (only possible with alpha = 0).
LOG_LOSS_EPS = 1e-6
# Lambdas per held-out curve while choosing alpha (thinned as in evaluation.lambda_breakpoints): the
# choice needs the curves' ranking, not their last digit, and is made 65 times per fit.
SELECTION_MAX_LAMBDAS = 1000


@dataclass(frozen=True)
class AlphaChoice:
    alpha: float
    method: str
    grid: tuple[float, ...] = ()
    cv_score: tuple[float, ...] = ()  # per grid value: mean held-out AUDC, or log-loss
    criterion: Criterion | None = None

    def as_metadata(self) -> dict[str, Any]:
        out: dict[str, Any] = {"alpha": self.alpha, "method": self.method}
        if self.grid:
            out["criterion"] = self.criterion
            out["grid"] = list(self.grid)
            out["cv_score"] = [round(v, 6) for v in self.cv_score]
        return out


@dataclass(frozen=True, eq=False)
class RoutingCosts:
    """What the AUDC criterion routes by (``route`` ``[M]``, the weights' cost) and scores with (``realised``
    ``[N, M]``, the cost of each call; NaN rows are left out of the score)."""

    route: np.ndarray
    realised: np.ndarray
    models: tuple[str, ...] = ()  # names for messages (default: column numbers)


def global_error(correct: np.ndarray) -> np.ndarray:
    """``[M]`` mean error per model over observed (non-NaN) outcomes."""
    observed = ~np.isnan(correct)
    counts = observed.sum(axis=0)
    if (counts == 0).any():
        missing = np.flatnonzero(counts == 0).tolist()
        raise ValueError(f"models at columns {missing} have no observed outcomes")
    wrong = np.where(observed, 1.0 - np.nan_to_num(correct), 0.0).sum(axis=0)
    return wrong / counts


def group_counts(groups: np.ndarray, correct: np.ndarray, num_groups: int) -> tuple[np.ndarray, np.ndarray]:
    """``(wrong, n)``, each ``[num_groups, M]``: summed ``1 - correct`` and observed outcomes per group."""
    observed = ~np.isnan(correct)
    wrong = np.where(observed, 1.0 - np.nan_to_num(correct), 0.0)
    wrong_sum = np.zeros((num_groups, correct.shape[1]))
    counts = np.zeros((num_groups, correct.shape[1]))
    np.add.at(wrong_sum, groups, wrong)
    np.add.at(counts, groups, observed.astype(np.float64))
    return wrong_sum, counts


def shrunk_rates(wrong: np.ndarray, counts: np.ndarray, prior: np.ndarray, strength: float) -> np.ndarray:
    """``(wrong + strength * prior) / (counts + strength)``; exactly ``prior`` where nothing is observed."""
    numer = wrong + strength * prior
    denom = counts + strength
    fallback = np.broadcast_to(prior, numer.shape).astype(np.float64)
    return np.clip(np.divide(numer, denom, out=fallback.copy(), where=denom > 0), 0.0, 1.0)


def task_rates(
    task_ids: np.ndarray, correct: np.ndarray, num_tasks: int, strength: float = TASK_PRIOR_STRENGTH
) -> np.ndarray:
    """``[T, M]`` each model's error per task, shrunk toward its global error with ``strength`` pseudo-rows."""
    wrong, counts = group_counts(np.asarray(task_ids, dtype=np.int64), correct, num_tasks)
    return shrunk_rates(wrong, counts, global_error(correct), strength)


def cluster_task_shares(assign: np.ndarray, task_ids: np.ndarray, k: int, num_tasks: int) -> np.ndarray:
    """``[K, T]`` task counts of each cluster's rows (rows of the matrix need not sum to anything)."""
    shares = np.zeros((k, num_tasks))
    np.add.at(shares, (np.asarray(assign, dtype=np.int64), np.asarray(task_ids, dtype=np.int64)), 1.0)
    return shares


def task_mix_prior(task_counts: np.ndarray, rates: np.ndarray, fallback: np.ndarray) -> np.ndarray:
    """``[K, M]``: each cluster's task-count-weighted mix of ``rates`` ``[T, M]``; ``fallback`` ``[M]``
    for clusters without rows."""
    totals = task_counts.sum(axis=1, keepdims=True)
    empty = np.zeros((task_counts.shape[0], rates.shape[1]))
    mixed = np.divide(task_counts @ rates, totals, out=empty, where=totals > 0)
    return np.where(totals > 0, mixed, fallback[None, :])


def fit_prior(
    assign: np.ndarray, correct: np.ndarray, k: int, task_ids: np.ndarray | None, num_tasks: int = 0
) -> np.ndarray:
    """``[K, M]`` the prior of :func:`cluster_error`: the task mix when tasks are given, else ``g[m]``."""
    g = global_error(correct)
    if task_ids is None or num_tasks < 2:
        return np.broadcast_to(g, (k, correct.shape[1])).copy()
    shares = cluster_task_shares(assign, task_ids, k, num_tasks)
    return task_mix_prior(shares, task_rates(task_ids, correct, num_tasks), g)


def cluster_error(
    assign: np.ndarray, correct: np.ndarray, k: int, alpha: float, prior: np.ndarray | None = None
) -> np.ndarray:
    """``[M, K]`` float32 per-cluster error shrunk toward ``prior`` ``[K, M]`` (default: each model's
    global error); see the module docstring."""
    assign = np.asarray(assign, dtype=np.int64)
    correct = np.asarray(correct, dtype=np.float64)
    if correct.ndim != 2 or assign.shape != (correct.shape[0],):
        raise ValueError(f"assign must be [N] and correct [N, M]; got {assign.shape} and {correct.shape}")
    if assign.size and (assign.min() < 0 or assign.max() >= k):
        raise ValueError(f"cluster ids must lie in [0, {k}); got {assign.min()}..{assign.max()}")
    if not (alpha >= 0 and np.isfinite(alpha)):
        raise ValueError(f"alpha must be finite and >= 0; got {alpha}")
    if prior is None:
        prior = np.broadcast_to(global_error(correct), (k, correct.shape[1]))
    elif prior.shape != (k, correct.shape[1]):
        raise ValueError(f"prior must be [K, M] = ({k}, {correct.shape[1]}); got {prior.shape}")
    wrong, counts = group_counts(assign, correct, k)
    return shrunk_rates(wrong, counts, prior, alpha).T.astype(np.float32)


def held_out_log_loss(error: np.ndarray, assign: np.ndarray, correct: np.ndarray, eps: float = LOG_LOSS_EPS) -> float:
    """Mean cross-entropy of observed outcomes under ``P(correct) = 1 - error[m, cluster]``."""
    p_correct = np.clip(1.0 - error.T[assign].astype(np.float64), eps, 1.0 - eps)  # [N, M]
    observed = ~np.isnan(correct)
    y = np.nan_to_num(correct)
    loss = -(y * np.log(p_correct) + (1.0 - y) * np.log1p(-p_correct))
    return float(loss[observed].mean())


def held_out_audc(
    error: np.ndarray, assign: np.ndarray, correct: np.ndarray, costs: RoutingCosts, rows: np.ndarray
) -> float:
    """AUDC of routing the held-out ``rows`` by ``error`` ``[M, K]`` (only rows observed for every model)."""
    scored = rows[observed_rows(correct[rows], costs.realised[rows])]
    models = costs.models or tuple(str(m) for m in range(correct.shape[1]))
    outcomes = Outcomes(models, correct[scored], costs.realised[scored])
    expected = error.T[assign[scored]].astype(np.float64)
    curve = system_curve(outcomes, expected, costs.route, SELECTION_MAX_LAMBDAS)
    return audc(curve.hull_cost, curve.hull_accuracy)


def fold_assignment(n: int, folds: int, seed: int) -> np.ndarray:
    """``[n]`` fold of each row: a seeded permutation taken modulo ``folds`` (sizes differ by at most one)."""
    if folds < 2 or n < folds:
        raise ValueError(f"need 2 <= folds <= rows; got {folds} folds for {n} rows")
    return np.random.default_rng(seed).permutation(n) % folds


def _fold_is_scorable(correct: np.ndarray, train: np.ndarray, test: np.ndarray, costs: RoutingCosts | None) -> bool:
    """Every model has an outcome among the ``train`` rows, and the ``test`` rows give something to score: a row
    observed for every model (AUDC, ``costs`` given) or any outcome (log-loss)."""
    if not (~np.isnan(correct[train])).any(axis=0).all():
        return False
    if costs is None:
        return bool((~np.isnan(correct[test])).any())
    return bool(observed_rows(correct[test], costs.realised[test]).any())


def select_alpha(
    assign: np.ndarray,
    correct: np.ndarray,
    k: int,
    *,
    task_ids: np.ndarray | None = None,
    num_tasks: int = 0,
    costs: RoutingCosts | None = None,
    grid: Sequence[float] = DEFAULT_ALPHA_GRID,
    folds: int = DEFAULT_CV_FOLDS,
    seed: int = DEFAULT_SEED,
) -> AlphaChoice:
    """Pick the shrinkage strength by ``folds``-fold CV: the highest mean held-out AUDC when ``costs`` are
    given, else the lowest held-out log-loss (ties: the first in ``grid``).

    Clusters stay fixed across folds: k-means never sees labels, so only the error estimates (and
    the prior, rebuilt from each fold's training rows) need held-out rows. A fold is left out when its
    training rows lack every outcome of some model or its held-out rows give nothing to score (models
    observed on a few rows only); with no fold left it is a ValueError.
    """
    criterion: Criterion = "audc" if costs is not None else "log-loss"
    fold_of = fold_assignment(correct.shape[0], folds, seed)
    priors: dict[int, np.ndarray] = {}
    for fold in range(folds):
        train, test = fold_of != fold, fold_of == fold
        if not _fold_is_scorable(correct, train, test, costs):
            continue
        tasks = None if task_ids is None else task_ids[train]
        priors[fold] = fit_prior(assign[train], correct[train], k, tasks, num_tasks)
    if not priors:
        needs = "an outcome and a cost for every model" if costs is not None else "an outcome"
        raise ValueError(
            f"cannot choose alpha by {folds}-fold cross-validation: in no fold do the training rows have an outcome "
            f"of every model and the held-out rows {needs} (some model has outcomes on too few rows); give --alpha"
        )
    scores = []
    for alpha in grid:
        fold_scores = []
        for fold in priors:
            train, test = fold_of != fold, fold_of == fold
            error = cluster_error(assign[train], correct[train], k, alpha, priors[fold])
            if costs is None:
                fold_scores.append(held_out_log_loss(error, assign[test], correct[test]))
            else:
                fold_scores.append(held_out_audc(error, assign, correct, costs, np.flatnonzero(test)))
        scores.append(float(np.mean(fold_scores)))
    best = int(np.argmax(scores) if criterion == "audc" else np.argmin(scores))
    what = "AUDC of held-out routed curves" if criterion == "audc" else "log-loss of held-out outcomes"
    scored = "" if len(priors) == folds else f", {len(priors)} of the folds scorable"
    return AlphaChoice(
        alpha=float(grid[best]),
        method=f"{folds}-fold cross-validated {what} (seed {seed}{scored})",
        grid=tuple(float(a) for a in grid),
        cv_score=tuple(scores),
        criterion=criterion,
    )

"""Router quality: score a weights file on labelled outcomes, or cross-validate ``fit`` on them.

Both give, per system, the metrics of :mod:`service.router.offline.evaluation` (AUDC, QNC, accuracy at a cost
budget) beside the baselines of :mod:`service.router.offline.baselines`.

Cross-validation (``K`` folds, rows assigned by a seeded permutation): each fold fits on the other
folds exactly as ``fit`` does and is scored on its own rows, with costs normalised by that fold's
most accurate single model. Compared on the same folds:

- the router (the given fit settings);
- the same clusters with errors shrunk toward each model's global rate (alpha by CV), when the router
  uses the task prior;
- plain k-means (one restart) with the raw mean error per cluster (alpha = 0);
- a task-name router: the per-task error table, looked up by each held-out prompt's *true* task
  (a reference that knows more than a router can);
- oracle, random mix, single-model envelope, each single model.

Every held-out prompt keeps its fold router's per-model errors, so the folds also pool into one
out-of-fold curve per system over all prompts (what the plot shows).
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from service.router.offline.baselines import Outcomes, baseline_curves, observed_rows, system_curve
from service.router.offline.costs import absolute_costs, has_observed_costs, relative_costs, require_observed_costs
from service.router.offline.costs import realised_costs as call_costs
from service.router.offline.data import LabelledSet
from service.router.offline.estimate import (
    DEFAULT_CV_FOLDS,
    RoutingCosts,
    cluster_error,
    fold_assignment,
    select_alpha,
)
from service.router.offline.evaluation import Curve, CurveMetrics, curve_metrics
from service.router.offline.fit import assign_clusters, fit_error_table, kmeans_centroids, task_index
from service.router.offline.options import DEFAULT_CLUSTERS, DEFAULT_RESTARTS, DEFAULT_SEED, Criterion, Prior
from service.router.scoring import ScoreTable
from service.router.weights import RouterWeights

ROUTER = "router"
GLOBAL_SHRINK = "k-means + shrinkage to global rate"
PLAIN = "plain k-means + mean error"
TASK_NAME = "task-name router (knows the task)"
DEFAULT_FOLDS = DEFAULT_CV_FOLDS
PLAIN_RESTARTS = 1
PLAIN_ALPHA = 0.0

Kind = Literal["router", "reference", "baseline", "single"]


@dataclass(frozen=True)
class FitSettings:
    k: int = DEFAULT_CLUSTERS
    seed: int = DEFAULT_SEED
    n_restarts: int = DEFAULT_RESTARTS
    alpha: float | None = None
    prior: Prior = "task"
    alpha_criterion: Criterion = "audc"


@dataclass(frozen=True, eq=False)
class QualityReport:
    """Per system: its metrics on each fold (one entry without CV), its pooled curve and that curve's metrics."""

    folds: int  # 0: a weights file scored on one labelled set
    metrics: dict[str, list[CurveMetrics]]
    kinds: dict[str, Kind]
    curves: dict[str, Curve]
    pooled: dict[str, CurveMetrics]
    fold_info: list[dict[str, Any]] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)


def realised_costs(labelled: LabelledSet, prices_relative: np.ndarray | None) -> tuple[np.ndarray, str]:
    """``[N, M]`` cost of each call: the observed per-row costs when every model has some, else the
    (relative) price of each model on every row; and which one it is."""
    realised = call_costs(labelled.cost_usd, prices_relative)
    observed = has_observed_costs(labelled.cost_usd)
    return realised, "observed cost per row (USD)" if observed else "list price per model"


def _kind_map(systems: list[str], models: tuple[str, ...], routers: set[str]) -> dict[str, Kind]:
    kinds: dict[str, Kind] = {}
    for name in systems:
        if name in routers:
            kinds[name] = "router"
        elif name == TASK_NAME:
            kinds[name] = "reference"
        elif name in models:
            kinds[name] = "single"
        else:
            kinds[name] = "baseline"
    return kinds


def fold_error_tables(
    embeddings: np.ndarray,
    labelled: LabelledSet,
    train: np.ndarray,
    test: np.ndarray,
    settings: FitSettings,
    costs: RoutingCosts,
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Per router system, ``[len(test), M]`` expected errors of the test rows, fitted on the train rows
    (``costs``: the train rows' route and realised costs, for choosing alpha by AUDC)."""
    x_train, x_test = embeddings[train], embeddings[test]
    correct = np.asarray(labelled.correct, dtype=np.float64)[train]
    tasks = [labelled.task[i] for i in np.flatnonzero(train)]
    table = fit_error_table(
        x_train,
        correct,
        tasks,
        k=settings.k,
        seed=settings.seed,
        n_restarts=settings.n_restarts,
        alpha=settings.alpha,
        prior=settings.prior,
        costs=costs if settings.alpha_criterion == "audc" else None,
    )
    test_assign = assign_clusters(x_test, table.centroids)
    errors = {ROUTER: table.error.T[test_assign]}
    info: dict[str, Any] = {"alpha": table.choice.alpha, "prior": table.prior}
    if table.prior == "task":
        # like for like: only the prior differs from the router's (its alpha chosen the same way, or the same given)
        alpha = settings.alpha
        if alpha is None:
            criterion_costs = costs if settings.alpha_criterion == "audc" else None
            alpha = select_alpha(table.assign, correct, settings.k, costs=criterion_costs, seed=settings.seed).alpha
        errors[GLOBAL_SHRINK] = cluster_error(table.assign, correct, settings.k, alpha).T[test_assign]
        info["global_shrink_alpha"] = alpha
    plain = kmeans_centroids(x_train, settings.k, seed=settings.seed, n_restarts=PLAIN_RESTARTS)
    plain_error = cluster_error(assign_clusters(x_train, plain), correct, settings.k, PLAIN_ALPHA)
    errors[PLAIN] = plain_error.T[assign_clusters(x_test, plain)]
    names, task_ids = task_index(labelled.task)
    if len(names) >= 2:
        by_task = cluster_error(task_ids[train], correct, len(names), PLAIN_ALPHA)
        errors[TASK_NAME] = by_task.T[task_ids[test]]
    return errors, info


def cross_validate(
    labelled: LabelledSet,
    embeddings: np.ndarray,
    realised_cost: np.ndarray,
    *,
    route_cost: np.ndarray | None,
    folds: int = DEFAULT_FOLDS,
    settings: FitSettings | None = None,
    progress: bool = False,
) -> QualityReport:
    """``folds``-fold CV of ``fit`` (see the module docstring). ``route_cost`` ``[M]`` is what the routers
    trade off (the relative prices ``fit`` stores); None: each fold's observed cost per call, relative."""
    from tqdm import tqdm

    settings = settings or FitSettings()
    n = labelled.num_rows
    usable = observed_rows(labelled.correct, realised_cost)
    fold_of = fold_assignment(n, folds, settings.seed)
    correct = np.asarray(labelled.correct, dtype=np.float64)
    oof: dict[str, np.ndarray] = {}
    oof_cost = np.full((n, len(labelled.models)), np.nan)
    per_fold: dict[str, list[CurveMetrics]] = {}
    fold_info: list[dict[str, Any]] = []
    _check_folds(labelled.models, correct, usable, fold_of, folds)
    for fold in tqdm(range(folds), desc="cross-validation folds", file=sys.stderr, disable=not progress):
        train, test = fold_of != fold, (fold_of == fold) & usable
        outcomes = Outcomes(labelled.models, correct[test], realised_cost[test])
        cost = route_cost
        if cost is None:
            require_observed_costs(labelled.models, labelled.cost_usd[train], f"the training rows of fold {fold + 1}")
            cost = relative_costs(absolute_costs(labelled.models, labelled.cost_usd[train], None))
        costs = RoutingCosts(np.asarray(cost, dtype=np.float64), realised_cost[train], labelled.models)
        errors, info = fold_error_tables(embeddings, labelled, train, test, settings, costs)
        curves = {name: system_curve(outcomes, e, cost) for name, e in errors.items()} | baseline_curves(outcomes)
        for name, curve in curves.items():
            per_fold.setdefault(name, []).append(curve_metrics(curve, outcomes.target_accuracy))
        for name, e in errors.items():
            oof.setdefault(name, np.full((n, len(labelled.models)), np.nan))[test] = e
        oof_cost[test] = cost
        fold_info.append({**info, **_outcomes_info(outcomes), "fold": fold})
    pooled_outcomes = Outcomes(labelled.models, correct[usable], realised_cost[usable])
    pooled_curves = {name: system_curve(pooled_outcomes, e[usable], oof_cost[usable]) for name, e in oof.items()}
    pooled_curves |= baseline_curves(pooled_outcomes)
    return QualityReport(
        folds=folds,
        metrics=per_fold,
        kinds=_kind_map(list(per_fold), labelled.models, {ROUTER, GLOBAL_SHRINK, PLAIN}),
        curves=pooled_curves,
        pooled={name: curve_metrics(c, pooled_outcomes.target_accuracy) for name, c in pooled_curves.items()},
        fold_info=fold_info,
        info={"rows": n, **_outcomes_info(pooled_outcomes)},
    )


def _check_folds(
    models: tuple[str, ...], correct: np.ndarray, usable: np.ndarray, fold_of: np.ndarray, folds: int
) -> None:
    """Before any fitting: every fold has held-out rows to score and an outcome of every model to train on."""
    observed = (~np.isnan(correct)).sum(axis=0)
    for fold in range(folds):
        held_out = fold_of == fold
        if not (held_out & usable).any():
            raise ValueError(
                f"fold {fold + 1} of {folds}: none of its {int(held_out.sum())} held-out prompts has an outcome and a "
                f"cost for every model ({usable.sum()} of {usable.size} prompts have); use fewer folds"
            )
        untrained = np.isnan(correct[~held_out]).all(axis=0)
        if untrained.any():
            names = ", ".join(f"{models[j]!r} ({observed[j]} outcomes)" for j in np.flatnonzero(untrained))
            raise ValueError(
                f"fold {fold + 1} of {folds}: its training rows have no outcome of {names}; use fewer folds"
            )


def evaluate_weights(
    weights: RouterWeights, labelled: LabelledSet, embeddings: np.ndarray, realised_cost: np.ndarray
) -> QualityReport:
    """The weights' router (nearest centroid, its error table and costs) and the baselines on ``labelled``."""
    missing = [m for m in weights.models if m not in labelled.models]
    if missing:
        raise ValueError(f"the labelled data has no outcomes for the weights' model(s): {', '.join(missing)}")
    # The service's own table: its columns in (cost, model id) order, so that exact ties (the cheaper, then the
    # lower column) break as the service breaks them, also for weights whose models add-model appended.
    table = ScoreTable.build(weights.models, weights.expected_error, weights.cost_per_1k)
    models = table.models
    columns = [labelled.models.index(m) for m in models]
    correct = np.asarray(labelled.correct, dtype=np.float64)[:, columns]
    cost = realised_cost[:, columns]
    usable = observed_rows(correct, cost)
    outcomes = Outcomes(models, correct[usable], cost[usable])
    assign = assign_clusters(embeddings[usable], weights.centroids)
    curves = {ROUTER: system_curve(outcomes, table.error_by_cluster[assign], table.cost)} | baseline_curves(outcomes)
    metrics = {name: curve_metrics(c, outcomes.target_accuracy) for name, c in curves.items()}
    return QualityReport(
        folds=0,
        metrics={name: [m] for name, m in metrics.items()},
        kinds=_kind_map(list(curves), models, {ROUTER}),
        curves=curves,
        pooled=metrics,
        info={"rows": labelled.num_rows, **_outcomes_info(outcomes)},
    )


def _outcomes_info(outcomes: Outcomes) -> dict[str, Any]:
    return {
        "rows_scored": outcomes.num_rows,
        "reference_model": outcomes.models[outcomes.reference],
        "reference_accuracy": outcomes.target_accuracy,
        "reference_mean_cost": outcomes.reference_cost,
        "cheapest_model": outcomes.models[outcomes.cheapest],
    }


def summarise(values: list[float]) -> dict[str, float | int | None]:
    """Mean, sample standard deviation, min and max over folds; ``inf`` values make mean and std None."""
    finite = [v for v in values if np.isfinite(v)]
    all_finite = len(finite) == len(values)
    spread = float(np.std(values, ddof=1)) if all_finite and len(values) > 1 else 0.0
    return {
        "mean": float(np.mean(values)) if all_finite else None,
        "std": spread if all_finite else None,
        "min": float(min(values)) if all_finite else None,
        "max": float(max(finite)) if finite else None,
        "finite": len(finite),
        "n": len(values),
    }


def metric_table(metrics: Mapping[str, list[CurveMetrics]]) -> dict[str, dict[str, dict[str, float | int | None]]]:
    """``{system: {metric: summary}}`` for AUDC, QNC, max accuracy and each accuracy@budget."""
    out: dict[str, dict[str, dict[str, float | int | None]]] = {}
    for name, folds in metrics.items():
        fields = {"audc": [m.audc for m in folds], "qnc": [m.qnc for m in folds]}
        fields["max_accuracy"] = [m.max_accuracy for m in folds]
        for budget in folds[0].accuracy_at:
            fields[f"acc@{budget:g}"] = [m.accuracy_at[budget] for m in folds]
        out[name] = {key: summarise(values) for key, values in fields.items()}
    return out


def paired_difference(report: QualityReport, better: str, worse: str) -> dict[str, float | int] | None:
    """AUDC of ``better`` minus ``worse``, fold by fold: mean, sample std and how many folds it wins."""
    if better not in report.metrics or worse not in report.metrics:
        return None
    diff = np.array([a.audc - b.audc for a, b in zip(report.metrics[better], report.metrics[worse], strict=True)])
    return {
        "mean": float(diff.mean()),
        "std": float(diff.std(ddof=1)) if diff.size > 1 else 0.0,
        "wins": int((diff > 0).sum()),
        "n": int(diff.size),
    }

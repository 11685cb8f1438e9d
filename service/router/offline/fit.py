"""Fit router weights UniRoute-style from labelled outcomes.

1. Spherical k-means on the prompt embeddings gives K unit centroids (FAISS, seeded; the restart with
   the highest objective ``sum_i max_c <x_i, mu_c>`` is kept).
2. Each prompt goes to its nearest centroid (inner product, as the router does at run time).
3. Per cluster and model, the error rate is shrunk toward a prior: the mix of the model's per-task
   error rates over the cluster's training tasks (or its global rate when the data has one task), so
   small clusters do not get 0 % or 100 % from a handful of rows (formulas in ``estimate.py``). The
   strength ``alpha`` is chosen by cross-validation: held-out AUDC by default, or log-loss
   (``--alpha-criterion``).
4. Cost is the blended list price relative to the most expensive model, or (``--costs rows``) the mean
   observed cost per call relative to the most expensive model.

``python -m service fit`` calls :func:`fit_main` with the flags from ``options.add_fit_arguments``.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from service import __version__
from service.digest import source_commit
from service.router.offline.costs import (
    COST_UNIT,
    COST_UNIT_ROWS,
    INPUT_PRICE_WEIGHT,
    OUTPUT_PRICE_WEIGHT,
    absolute_costs,
    blended_prices,
    relative_costs,
    require_observed_costs,
    routing_costs,
)
from service.router.offline.data import DataError, LabelledSet, load_labelled, load_prices, require_outcomes
from service.router.offline.estimate import (
    DEFAULT_CV_FOLDS,
    TASK_PRIOR_STRENGTH,
    AlphaChoice,
    RoutingCosts,
    cluster_error,
    cluster_task_shares,
    fit_prior,
    global_error,
    select_alpha,
)
from service.router.offline.options import (
    DEFAULT_CLUSTERS,
    DEFAULT_LAMBDA,
    DEFAULT_RESTARTS,
    DEFAULT_SEED,
    PRICES_FILE,
    PRIORS,
    Criterion,
    Prior,
    TextMode,
    prices_file,
)
from service.router.weights import MAX_COST_WEIGHT, RouterWeights, WeightsError, save_weights

DEFAULT_KMEANS_ITERATIONS = 50
# FAISS takes the k-means seed as a C int (restart r uses seed + r).
MAX_SEED = 2**31 - 1


def _faiss() -> Any:
    """FAISS (its k-means), imported when a fit needs it: ``eval`` and ``add-model`` run without it, and a plain
    ``pip install -e .`` (no ``[cpu]`` extra) gets this message instead of a ModuleNotFoundError traceback."""
    try:
        import faiss
    except ImportError:
        raise ValueError("fitting clusters needs FAISS: pip install faiss-cpu (the project's [cpu] extra)") from None
    return faiss


def kmeans_centroids(
    embeddings: np.ndarray,
    k: int,
    seed: int = DEFAULT_SEED,
    n_restarts: int = DEFAULT_RESTARTS,
    niter: int = DEFAULT_KMEANS_ITERATIONS,
    *,
    progress: bool = False,
) -> np.ndarray:
    """``[k, D]`` float32 unit centroids from spherical k-means: restart ``r`` is seeded ``seed + r`` and
    the one with the highest :func:`kmeans_objective` is kept (the first on a tie)."""
    from tqdm import tqdm

    x = np.ascontiguousarray(embeddings, dtype=np.float32)
    if x.ndim != 2 or x.shape[0] < k or k < 1:
        raise ValueError(f"need an [N, D] array with N >= k >= 1; got shape {x.shape} and k={k}")
    if n_restarts < 1:
        raise ValueError(f"n_restarts must be >= 1; got {n_restarts}")
    best: np.ndarray | None = None
    best_objective = -np.inf
    faiss = _faiss()
    for restart in tqdm(range(n_restarts), desc="k-means restarts", file=sys.stderr, disable=not progress):
        kmeans = faiss.Kmeans(
            x.shape[1],
            k,
            niter=niter,
            nredo=1,
            spherical=True,
            seed=seed + restart,
            verbose=False,
            # Small training sets are the norm here: no "too few points" warning, no subsampling.
            min_points_per_centroid=1,
            max_points_per_centroid=x.shape[0],
        )
        kmeans.train(x)
        assert kmeans.centroids is not None
        centroids = normalise_rows(kmeans.centroids)
        objective = kmeans_objective(x, centroids)
        if objective > best_objective:
            best, best_objective = centroids, objective
    assert best is not None
    return best


def kmeans_objective(embeddings: np.ndarray, centroids: np.ndarray) -> float:
    """``sum_i max_c <x_i, mu_c>``: total similarity of each point to its nearest centroid (higher is better)."""
    return float((np.asarray(embeddings, dtype=np.float64) @ centroids.T.astype(np.float64)).max(axis=1).sum())


def normalise_rows(matrix: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm (in float64, returned as float32); zero rows are an error."""
    m = np.asarray(matrix, dtype=np.float64)
    norms = np.linalg.norm(m, axis=1, keepdims=True)
    if (norms == 0).any():
        raise ValueError("cannot normalise a zero row")
    return (m / norms).astype(np.float32)


def assign_clusters(embeddings: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """Index of the nearest centroid by inner product, as the router's FAISS IndexFlatIP does."""
    return np.argmax(np.asarray(embeddings, dtype=np.float32) @ centroids.T, axis=1).astype(np.int64)


def task_index(tasks: Sequence[str]) -> tuple[tuple[str, ...], np.ndarray]:
    """Sorted distinct task names and each row's index into them."""
    names = tuple(sorted(set(tasks)))
    lookup = {name: i for i, name in enumerate(names)}
    return names, np.array([lookup[t] for t in tasks], dtype=np.int64)


# eq=False: ndarray fields make field-wise == ambiguous.
@dataclass(frozen=True, eq=False)
class ErrorTable:
    """What ``fit`` learns from outcomes, before costs: centroids and per-cluster errors."""

    centroids: np.ndarray  # [K, D] float32 unit rows
    assign: np.ndarray  # [N] training row -> cluster
    error: np.ndarray  # [M, K] float32
    choice: AlphaChoice
    prior: Prior  # the prior actually used ("global" when the data has fewer than two tasks)
    task_names: tuple[str, ...]
    task_counts: np.ndarray  # [K, T] training rows of each task per cluster


def fit_error_table(
    embeddings: np.ndarray,
    correct: np.ndarray,
    tasks: Sequence[str],
    *,
    k: int = DEFAULT_CLUSTERS,
    seed: int = DEFAULT_SEED,
    n_restarts: int = DEFAULT_RESTARTS,
    alpha: float | None = None,
    prior: Prior = "task",
    costs: RoutingCosts | None = None,
    progress: bool = False,
) -> ErrorTable:
    """Cluster, then estimate the per-cluster errors; ``alpha=None`` selects it by CV: by held-out AUDC when
    ``costs`` are given, else by held-out log-loss."""
    if prior not in PRIORS:
        raise ValueError(f"prior must be one of {', '.join(PRIORS)}; got {prior!r}")
    centroids = kmeans_centroids(embeddings, k, seed=seed, n_restarts=n_restarts, progress=progress)
    assign = assign_clusters(embeddings, centroids)
    names, task_ids = task_index(tasks)
    used: Prior = prior if len(names) >= 2 else "global"
    ids = task_ids if used == "task" else None
    num_tasks = len(names) if used == "task" else 0
    correct = np.asarray(correct, dtype=np.float64)
    if alpha is None:
        choice = select_alpha(assign, correct, k, task_ids=ids, num_tasks=num_tasks, costs=costs, seed=seed)
    else:
        choice = AlphaChoice(alpha=float(alpha), method="given")
    error = cluster_error(assign, correct, k, choice.alpha, fit_prior(assign, correct, k, ids, num_tasks))
    return ErrorTable(
        centroids=centroids,
        assign=assign,
        error=error,
        choice=choice,
        prior=used,
        task_names=names,
        task_counts=cluster_task_shares(assign, task_ids, k, len(names)),
    )


def fit_weights(
    labelled: LabelledSet,
    embeddings: np.ndarray,
    *,
    prices: Mapping[str, tuple[float, float]] | None,
    embedder_id: str,
    embedder_sha256: str,
    k: int = DEFAULT_CLUSTERS,
    seed: int = DEFAULT_SEED,
    alpha: float | None = None,
    n_restarts: int = DEFAULT_RESTARTS,
    prior: Prior = "task",
    alpha_criterion: Criterion = "audc",
    default_lambda: float = DEFAULT_LAMBDA,
    provenance: Mapping[str, Any] | None = None,
    progress: bool = False,
) -> RouterWeights:
    """Weights from outcomes and their prompts' embeddings; ``alpha=None`` selects it by CV.

    Costs come from ``prices`` (blended list prices) or, when it is None, from the observed per-row costs.
    """
    if embeddings.shape[0] != labelled.num_rows or embeddings.ndim != 2:
        raise ValueError(f"embeddings must be [{labelled.num_rows}, D]; got {embeddings.shape}")
    if not np.isfinite(embeddings).all():
        raise ValueError("embeddings contain NaN or inf")
    absolute = absolute_costs(labelled.models, labelled.cost_usd, prices)
    route_cost = relative_costs(absolute)
    costs = routing_costs(labelled.cost_usd, route_cost, labelled.models) if alpha_criterion == "audc" else None
    table = fit_error_table(
        embeddings,
        labelled.correct,
        labelled.task,
        k=k,
        seed=seed,
        n_restarts=n_restarts,
        alpha=alpha,
        prior=prior,
        costs=costs,
        progress=progress,
    )
    metadata = _fit_metadata(labelled, table, seed, n_restarts, absolute, prices, provenance)
    weights = RouterWeights(
        models=labelled.models,
        centroids=table.centroids,
        expected_error=table.error,
        cost_per_1k=route_cost,
        default_lambda=float(default_lambda),
        embedder_id=embedder_id,
        embedder_sha256=embedder_sha256,
        metadata=metadata,
    )
    weights.validate()
    return weights


def _fit_metadata(
    labelled: LabelledSet,
    table: ErrorTable,
    seed: int,
    n_restarts: int,
    absolute_cost: np.ndarray,
    prices: Mapping[str, tuple[float, float]] | None,
    provenance: Mapping[str, Any] | None,
) -> dict[str, Any]:
    models = labelled.models
    k = table.centroids.shape[0]
    observed_cost = np.where(np.isnan(labelled.cost_usd), 0.0, labelled.cost_usd).sum(axis=0)
    observed_calls = (~np.isnan(labelled.cost_usd)).sum(axis=0)
    if prices is not None:
        costs: dict[str, Any] = {
            "cost_unit": COST_UNIT,
            "cost_blend": {"input_weight": INPUT_PRICE_WEIGHT, "output_weight": OUTPUT_PRICE_WEIGHT},
            "price_usd_per_1k": {
                m: {"input": prices[m][0], "output": prices[m][1], "blended": float(b)}
                for m, b in zip(models, absolute_cost, strict=True)
            },
        }
    else:
        costs = {
            "cost_unit": COST_UNIT_ROWS,
            "observed_cost_usd_per_call": {m: float(c) for m, c in zip(models, absolute_cost, strict=True)},
        }
    prior_name = "the cluster's task mix of per-task rates" if table.prior == "task" else "the global rate"
    return {
        **costs,
        "fit": {
            "method": f"spherical k-means + per-cluster error shrunk toward {prior_name}",
            "clusters": k,
            "seed": seed,
            "restarts": n_restarts,
            "restart_selection": "highest k-means objective (sum of nearest-centroid inner products)",
            "kmeans_iterations": DEFAULT_KMEANS_ITERATIONS,
            "alpha": table.choice.alpha,
            "alpha_selection": table.choice.as_metadata(),
            "prior": table.prior,
            "task_prior_strength": TASK_PRIOR_STRENGTH,
            "text_mode": labelled.text_mode,
            "cluster_sizes": np.bincount(table.assign, minlength=k).tolist(),
            "cluster_task_counts": {
                name: table.task_counts[:, t].astype(int).tolist() for t, name in enumerate(table.task_names)
            },
        },
        "training_data": {
            "files": labelled.sources_json(),
            "rows_used": labelled.num_rows,
            "outcomes_observed": int((~np.isnan(labelled.correct)).sum()),
            "tasks": labelled.task_counts,
            "global_error": {m: float(g) for m, g in zip(models, global_error(labelled.correct), strict=True)},
            "mean_cost_usd_per_call": {
                m: float(c / max(int(n), 1)) for m, c, n in zip(models, observed_cost, observed_calls, strict=True)
            },
        },
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "tool": {
            "name": "service.router.offline.fit",
            "version": __version__,
            "git_commit": source_commit(),
            "faiss": _faiss().__version__,
            "numpy": np.__version__,
        },
        "provenance": dict(provenance or {}),
    }


# --- CLI -------------------------------------------------------------------------------------


def load_inputs(
    args: argparse.Namespace, text_mode: TextMode, *, require_prices: bool
) -> tuple[LabelledSet, dict[str, tuple[float, float]] | None, Path | None]:
    """The labelled files and the price list (``options.prices_file``), which ``require_prices`` makes
    mandatory: fitting with ``--costs prices`` needs it, scoring weights with their own costs does not."""
    data: list[Path] = list(args.data)
    missing = [str(path) for path in data if not path.is_file()]
    if missing:
        raise DataError(f"no such labelled file: {', '.join(missing)}")
    wants_prices = getattr(args, "costs", "prices") == "prices" or args.prices is not None
    prices_path = prices_file(args) if wants_prices else None
    if prices_path is None and require_prices:
        raise DataError(f"--costs prices needs a price list: pass --prices or put {PRICES_FILE} beside the data")
    prices = load_prices(prices_path) if prices_path is not None else None
    labelled = load_labelled(data, text_mode=text_mode, price_models=tuple(prices or ()))
    return labelled, prices, prices_path


def fit_main(args: argparse.Namespace) -> int:
    """Load, embed, fit, save, print a summary; returns the process exit code."""
    out: Path = args.out
    text_mode: TextMode = args.text
    try:
        _faiss()  # before the inputs are read and embedded, which takes minutes
        labelled, prices, prices_path = load_inputs(args, text_mode, require_prices=args.costs == "prices")
        require_outcomes(labelled)
        check_fit_settings(labelled.num_rows, args.clusters, args.restarts, args.alpha, args.seed)
        if (collapsed := labelled.collapsed_texts_warning()) is not None:
            print(f"warning: {collapsed}", file=sys.stderr)
        if not 0 <= args.default_lambda <= MAX_COST_WEIGHT:  # NaN fails too; the weights file would refuse it
            raise DataError(f"--default-lambda must be from 0 to {MAX_COST_WEIGHT:g}; got {args.default_lambda}")
        if args.costs == "rows":
            require_observed_costs(labelled.models, labelled.cost_usd)
        elif prices is not None:
            blended_prices(labelled.models, prices)  # every model priced, before the minutes of embedding
        embeddings, embedder_id, embedder_sha256 = embed_prompts(
            labelled.texts, cache=args.embedding_cache, progress=not args.no_progress
        )
        weights = fit_weights(
            labelled,
            embeddings,
            prices=prices if args.costs == "prices" else None,
            embedder_id=embedder_id,
            embedder_sha256=embedder_sha256,
            k=args.clusters,
            seed=args.seed,
            alpha=args.alpha,
            n_restarts=args.restarts,
            prior=args.prior,
            alpha_criterion=args.alpha_criterion,
            default_lambda=args.default_lambda,
            provenance={"prices_file": prices_path.name if prices_path else None, "argv": sys.argv[1:]},
            progress=not args.no_progress,
        )
        save_weights(weights, out)
    except (DataError, WeightsError, ValueError, OSError) as exc:
        print(f"fit failed: {exc}", file=sys.stderr)
        return 1
    print(format_summary(weights, out))
    return 0


def recorded_fit(weights: RouterWeights) -> Mapping[str, Any]:
    """The fit settings ``fit`` recorded in the weights' metadata (``{}`` for weights without them).

    Weights from elsewhere pass validation with any JSON metadata, so the shape is checked here: a
    ``fit`` entry that is not an object is a :class:`WeightsError`, not a crash further on."""
    recorded = weights.metadata.get("fit", {})
    if not isinstance(recorded, Mapping):
        raise WeightsError(f"the weights' metadata 'fit' must be a JSON object; got {type(recorded).__name__}")
    return recorded


def check_fit_settings(
    rows: int, clusters: int, restarts: int, alpha: float | None, seed: int, *, what: str = "the data"
) -> None:
    """Before embedding: enough rows for ``--clusters`` and for the CV that chooses alpha, sane flag values.

    ``rows`` is what one fit sees (``what`` says which rows: the data, or a CV fold's training rows)."""
    if not 0 <= seed <= MAX_SEED - max(restarts - 1, 0):
        raise DataError(f"--seed must lie in [0, {MAX_SEED}] with the restarts' seeds (seed + restart) too; got {seed}")
    if clusters < 1:
        raise DataError(f"--clusters must be at least 1; got {clusters}")
    if restarts < 1:
        raise DataError(f"--restarts must be at least 1; got {restarts}")
    if alpha is not None and not 0 <= alpha < math.inf:  # NaN fails too
        raise DataError(f"--alpha must be finite and >= 0; got {alpha}")
    if rows == 0:
        raise DataError(f"{what} has no rows")
    if rows < clusters:
        raise DataError(f"--clusters {clusters} needs at least {clusters} prompts to fit on; {what} has {rows}")
    if alpha is None and rows < DEFAULT_CV_FOLDS:
        raise DataError(
            f"choosing alpha by {DEFAULT_CV_FOLDS}-fold cross-validation needs at least {DEFAULT_CV_FOLDS} prompts; "
            f"{what} has {rows}: give --alpha"
        )


def weights_text_mode(weights: RouterWeights) -> TextMode:
    """Which part of each prompt ``weights`` were fitted on (``fit`` records it), to embed new data alike."""
    return "full" if recorded_fit(weights).get("text_mode") == "full" else "last_block"


def embed_prompts(
    texts: Sequence[str], *, cache: Path | None = None, progress: bool = True
) -> tuple[np.ndarray, str, str]:
    """The prompts' embeddings and the embedder's id and weights hash (a seam the tests replace)."""
    from service.router.offline.embed import embed_texts

    embedded = embed_texts(texts, cache=cache, progress=progress)
    return embedded.vectors, embedded.embedder_id, embedded.embedder_sha256


def format_summary(weights: RouterWeights, out: Path) -> str:
    fit = weights.metadata["fit"]
    training = weights.metadata["training_data"]
    width = max(len(m) for m in weights.models)
    lines = [
        f"wrote {out} ({weights.version})",
        f"rows {training['rows_used']}, K={weights.num_clusters}, D={weights.dim}, prior={fit['prior']}, "
        f"alpha={fit['alpha']:g} ({fit['alpha_selection']['method']}), default lambda={weights.default_lambda:g}",
        f"{'model':<{width}}  global error  relative cost",
    ]
    for i, model in enumerate(weights.models):
        g = training["global_error"][model]
        lines.append(f"{model:<{width}}  {g:12.3f}  {float(weights.cost_per_1k[i]):13.4f}")
    return "\n".join(lines)

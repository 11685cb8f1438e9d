"""Fit router weights UniRoute-style from labelled outcomes.

1. Spherical k-means on the prompt embeddings gives K unit centroids.
2. Each prompt goes to its nearest centroid (inner product, as the router does at run time).
3. Per cluster and model, the error rate is shrunk toward that model's global error rate, so
   small clusters do not get 0 % or 100 % from a handful of rows.
4. Cost is the blended list price relative to the most expensive model.

``python -m service fit`` calls :func:`fit_main` with the flags from :func:`add_fit_arguments`.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from service import __version__
from service.router.data import TEXT_MODES, DataError, LabelledSet, TextMode, load_prices, load_routerbench
from service.router.weights import RouterWeights, WeightsError, default_weights_path, save_weights

DEFAULT_CLUSTERS = 100
DEFAULT_SEED = 0
DEFAULT_RESTARTS = 10
DEFAULT_KMEANS_ITERATIONS = 50
DEFAULT_LAMBDA = 0.1
# Shrinkage strengths tried by cross-validation; the prior counts as this many pseudo-observations.
DEFAULT_ALPHA_GRID: tuple[float, ...] = (0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0)
DEFAULT_CV_FOLDS = 5
# Keeps log-loss finite when a shrunk estimate is exactly 0 or 1 (only possible with alpha = 0).
LOG_LOSS_EPS = 1e-6
# Typical chat traffic reads more than it writes: blend list prices 3 input : 1 output.
INPUT_PRICE_WEIGHT = 3.0
OUTPUT_PRICE_WEIGHT = 1.0
COST_UNIT = "relative blended list price per 1k tokens (3:1 input:output), most expensive model = 1.0"
EMBEDDER_BATCH_SIZE = 64

DEFAULT_DATA_DIR = Path("..") / "shared" / "data" / "routerbench"
DEFAULT_TRAIN_FILES = ("arc_challenge_train.csv", "mbpp_train.csv", "winograde_train.csv")
PRICES_FILE = "prices.json"


@dataclass(frozen=True)
class AlphaChoice:
    alpha: float
    method: str
    grid: tuple[float, ...] = ()
    cv_log_loss: tuple[float, ...] = ()

    def as_metadata(self) -> dict[str, Any]:
        out: dict[str, Any] = {"alpha": self.alpha, "method": self.method}
        if self.grid:
            out["grid"] = list(self.grid)
            out["cv_log_loss"] = [round(v, 6) for v in self.cv_log_loss]
        return out


def kmeans_centroids(
    embeddings: np.ndarray,
    k: int,
    seed: int = DEFAULT_SEED,
    n_restarts: int = DEFAULT_RESTARTS,
    niter: int = DEFAULT_KMEANS_ITERATIONS,
) -> np.ndarray:
    """``[k, D]`` float32 unit centroids from spherical k-means; the best of ``n_restarts`` runs."""
    x = np.ascontiguousarray(embeddings, dtype=np.float32)
    if x.ndim != 2 or x.shape[0] < k or k < 1:
        raise ValueError(f"need an [N, D] array with N >= k >= 1; got shape {x.shape} and k={k}")
    if n_restarts < 1:
        raise ValueError(f"n_restarts must be >= 1; got {n_restarts}")
    kmeans = faiss.Kmeans(
        x.shape[1],
        k,
        niter=niter,
        nredo=n_restarts,
        spherical=True,
        seed=seed,
        verbose=False,
        # Small training sets are the norm here: no "too few points" warning, no subsampling.
        min_points_per_centroid=1,
        max_points_per_centroid=x.shape[0],
    )
    kmeans.train(x)
    assert kmeans.centroids is not None
    return normalise_rows(kmeans.centroids)


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


def global_error(correct: np.ndarray) -> np.ndarray:
    """``[M]`` mean error per model over observed (non-NaN) outcomes."""
    observed = ~np.isnan(correct)
    counts = observed.sum(axis=0)
    if (counts == 0).any():
        missing = np.flatnonzero(counts == 0).tolist()
        raise ValueError(f"models at columns {missing} have no observed outcomes")
    wrong = np.where(observed, 1.0 - np.nan_to_num(correct), 0.0).sum(axis=0)
    return wrong / counts


def cluster_error(assign: np.ndarray, correct: np.ndarray, k: int, alpha: float) -> np.ndarray:
    """``[M, K]`` float32 per-cluster error, shrunk toward each model's global error.

    For model ``m`` and cluster ``c``::

        error[m, c] = (wrong[m, c] + alpha * g[m]) / (n[m, c] + alpha)

    where ``wrong`` sums ``1 - correct`` and ``n`` counts the observed outcomes of rows assigned to
    ``c`` (NaN outcomes are left out, per model), and ``g[m]`` is the model's error over all observed
    rows. ``alpha`` acts as that many pseudo-observations at the global rate; a cluster with no
    observations for a model (``n = 0``) gets exactly ``g[m]``, also when ``alpha = 0``.
    """
    assign = np.asarray(assign, dtype=np.int64)
    correct = np.asarray(correct, dtype=np.float64)
    if correct.ndim != 2 or assign.shape != (correct.shape[0],):
        raise ValueError(f"assign must be [N] and correct [N, M]; got {assign.shape} and {correct.shape}")
    if assign.size and (assign.min() < 0 or assign.max() >= k):
        raise ValueError(f"cluster ids must lie in [0, {k}); got {assign.min()}..{assign.max()}")
    if not (alpha >= 0 and np.isfinite(alpha)):
        raise ValueError(f"alpha must be finite and >= 0; got {alpha}")
    g = global_error(correct)
    observed = ~np.isnan(correct)
    wrong = np.where(observed, 1.0 - np.nan_to_num(correct), 0.0)
    num_models = correct.shape[1]
    wrong_sum = np.zeros((k, num_models))
    counts = np.zeros((k, num_models))
    np.add.at(wrong_sum, assign, wrong)
    np.add.at(counts, assign, observed.astype(np.float64))
    numer = wrong_sum + alpha * g
    denom = counts + alpha
    error = np.divide(numer, denom, out=np.broadcast_to(g, numer.shape).copy(), where=denom > 0)
    return np.clip(error, 0.0, 1.0).T.astype(np.float32)


def held_out_log_loss(error: np.ndarray, assign: np.ndarray, correct: np.ndarray, eps: float = LOG_LOSS_EPS) -> float:
    """Mean cross-entropy of observed outcomes under ``P(correct) = 1 - error[m, cluster]``."""
    p_correct = np.clip(1.0 - error.T[assign].astype(np.float64), eps, 1.0 - eps)  # [N, M]
    observed = ~np.isnan(correct)
    y = np.nan_to_num(correct)
    loss = -(y * np.log(p_correct) + (1.0 - y) * np.log1p(-p_correct))
    return float(loss[observed].mean())


def select_alpha(
    assign: np.ndarray,
    correct: np.ndarray,
    k: int,
    *,
    grid: Sequence[float] = DEFAULT_ALPHA_GRID,
    folds: int = DEFAULT_CV_FOLDS,
    seed: int = DEFAULT_SEED,
) -> AlphaChoice:
    """Pick the shrinkage strength with the lowest ``folds``-fold held-out log-loss.

    Clusters stay fixed across folds: k-means never sees labels, so only the error estimates
    need held-out rows.
    """
    n = correct.shape[0]
    if n < folds:
        raise ValueError(f"need at least {folds} rows for {folds}-fold CV; got {n}")
    fold_of = np.random.default_rng(seed).permutation(n) % folds
    losses = []
    for alpha in grid:
        fold_losses = []
        for fold in range(folds):
            train, test = fold_of != fold, fold_of == fold
            error = cluster_error(assign[train], correct[train], k, alpha)
            fold_losses.append(held_out_log_loss(error, assign[test], correct[test]))
        losses.append(float(np.mean(fold_losses)))
    best = int(np.argmin(losses))
    return AlphaChoice(
        alpha=float(grid[best]),
        method=f"{folds}-fold cross-validated log-loss of held-out outcomes (seed {seed})",
        grid=tuple(float(a) for a in grid),
        cv_log_loss=tuple(losses),
    )


def blended_prices(
    models: Sequence[str],
    prices: Mapping[str, tuple[float, float]],
    input_weight: float = INPUT_PRICE_WEIGHT,
    output_weight: float = OUTPUT_PRICE_WEIGHT,
) -> np.ndarray:
    """``[M]`` USD per 1k tokens: ``(input_weight * input + output_weight * output) / (sum of weights)``."""
    missing = [m for m in models if m not in prices]
    if missing:
        raise ValueError(f"no price for model(s): {', '.join(missing)}")
    total = input_weight + output_weight
    return np.array([(input_weight * prices[m][0] + output_weight * prices[m][1]) / total for m in models])


def relative_costs(blended: np.ndarray) -> np.ndarray:
    """Blended prices divided by the largest, so the most expensive model costs 1.0."""
    top = float(np.max(blended))
    if top <= 0:
        raise ValueError("at least one model needs a positive price")
    return (blended / top).astype(np.float32)


def fit_weights(
    labelled: LabelledSet,
    embeddings: np.ndarray,
    *,
    prices: Mapping[str, tuple[float, float]],
    embedder_id: str,
    embedder_sha256: str,
    k: int = DEFAULT_CLUSTERS,
    seed: int = DEFAULT_SEED,
    alpha: float | None = None,
    n_restarts: int = DEFAULT_RESTARTS,
    default_lambda: float = DEFAULT_LAMBDA,
    provenance: Mapping[str, Any] | None = None,
) -> RouterWeights:
    """Weights from outcomes and their prompts' embeddings; ``alpha=None`` selects it by CV."""
    if embeddings.shape[0] != labelled.num_rows or embeddings.ndim != 2:
        raise ValueError(f"embeddings must be [{labelled.num_rows}, D]; got {embeddings.shape}")
    if not np.isfinite(embeddings).all():
        raise ValueError("embeddings contain NaN or inf")
    centroids = kmeans_centroids(embeddings, k, seed=seed, n_restarts=n_restarts)
    assign = assign_clusters(embeddings, centroids)
    choice = AlphaChoice(alpha=float(alpha), method="given") if alpha is not None else None
    if choice is None:
        choice = select_alpha(assign, labelled.correct, k, seed=seed)
    error = cluster_error(assign, labelled.correct, k, choice.alpha)
    blended = blended_prices(labelled.models, prices)
    metadata = _fit_metadata(labelled, assign, k, seed, n_restarts, choice, blended, prices, provenance)
    weights = RouterWeights(
        models=labelled.models,
        centroids=centroids,
        expected_error=error,
        cost_per_1k=relative_costs(blended),
        default_lambda=float(default_lambda),
        embedder_id=embedder_id,
        embedder_sha256=embedder_sha256,
        metadata=metadata,
    )
    weights.validate()
    return weights


def _fit_metadata(
    labelled: LabelledSet,
    assign: np.ndarray,
    k: int,
    seed: int,
    n_restarts: int,
    choice: AlphaChoice,
    blended: np.ndarray,
    prices: Mapping[str, tuple[float, float]],
    provenance: Mapping[str, Any] | None,
) -> dict[str, Any]:
    models = labelled.models
    observed_cost = np.where(np.isnan(labelled.cost_usd), 0.0, labelled.cost_usd).sum(axis=0)
    observed_calls = (~np.isnan(labelled.cost_usd)).sum(axis=0)
    return {
        "cost_unit": COST_UNIT,
        "cost_blend": {"input_weight": INPUT_PRICE_WEIGHT, "output_weight": OUTPUT_PRICE_WEIGHT},
        "price_usd_per_1k": {
            m: {"input": prices[m][0], "output": prices[m][1], "blended": float(b)}
            for m, b in zip(models, blended, strict=True)
        },
        "fit": {
            "method": "spherical k-means + per-cluster error shrunk toward the global error",
            "clusters": k,
            "seed": seed,
            "restarts": n_restarts,
            "kmeans_iterations": DEFAULT_KMEANS_ITERATIONS,
            "alpha": choice.alpha,
            "alpha_selection": choice.as_metadata(),
            "text_mode": labelled.text_mode,
            "cluster_sizes": np.bincount(assign, minlength=k).tolist(),
        },
        "training_data": {
            "files": [{"name": s.name, "sha256": s.sha256, "rows": s.rows} for s in labelled.sources],
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
            "name": "service.router.fit",
            "version": __version__,
            "faiss": faiss.__version__,
            "numpy": np.__version__,
        },
        "provenance": dict(provenance or {}),
    }


# --- CLI -------------------------------------------------------------------------------------


def add_fit_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--data",
        nargs="+",
        type=Path,
        default=[DEFAULT_DATA_DIR / name for name in DEFAULT_TRAIN_FILES],
        metavar="FILE",
        help="RouterBench-style CSV files (default: the three train files under ../shared/data/routerbench)",
    )
    parser.add_argument("--prices", type=Path, default=None, help="prices JSON (default: prices.json beside the data)")
    parser.add_argument("--out", type=Path, default=None, help="weights file to write (default: the shipped file)")
    parser.add_argument("--clusters", type=int, default=DEFAULT_CLUSTERS, help="number of clusters K")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED, help="k-means and CV seed")
    parser.add_argument("--restarts", type=int, default=DEFAULT_RESTARTS, help="k-means restarts (best kept)")
    parser.add_argument("--alpha", type=float, default=None, help="shrinkage strength (default: chosen by CV)")
    parser.add_argument("--text", choices=TEXT_MODES, default="last_block", help="which part of each prompt to embed")
    parser.add_argument("--default-lambda", type=float, default=DEFAULT_LAMBDA, help="cost weight stored as default")


def fit_main(args: argparse.Namespace) -> int:
    """Load, embed, fit, save, print a summary; returns the process exit code."""
    data: list[Path] = list(args.data)
    prices_path: Path = args.prices or data[0].parent / PRICES_FILE
    out: Path = args.out or default_weights_path()
    text_mode: TextMode = args.text
    try:
        labelled = load_routerbench(data, text_mode=text_mode)
        prices = load_prices(prices_path)
        embeddings, embedder_id, embedder_sha256 = _embed(labelled.texts)
        weights = fit_weights(
            labelled,
            embeddings,
            prices=prices,
            embedder_id=embedder_id,
            embedder_sha256=embedder_sha256,
            k=args.clusters,
            seed=args.seed,
            alpha=args.alpha,
            n_restarts=args.restarts,
            default_lambda=args.default_lambda,
            provenance={"prices_file": prices_path.name, "argv": sys.argv[1:]},
        )
        save_weights(weights, out)
    except (DataError, WeightsError, ValueError, OSError) as exc:
        print(f"fit failed: {exc}", file=sys.stderr)
        return 1
    print(format_summary(weights, out))
    return 0


def _embed(texts: Sequence[str]) -> tuple[np.ndarray, str, str]:
    # Imported here so fitting code and its tests do not pay for torch unless they embed.
    from service.router.embedder import MiniLMEmbedder

    # float32 even on GPU: the fit should not depend on the machine it ran on.
    embedder = MiniLMEmbedder(dtype="float32")
    return embedder.embed(texts, batch_size=EMBEDDER_BATCH_SIZE), embedder.model_id, embedder.model_sha256


def format_summary(weights: RouterWeights, out: Path) -> str:
    fit = weights.metadata["fit"]
    training = weights.metadata["training_data"]
    width = max(len(m) for m in weights.models)
    lines = [
        f"wrote {out} ({weights.version})",
        f"rows {training['rows_used']}, K={weights.num_clusters}, D={weights.dim}, "
        f"alpha={fit['alpha']:g} ({fit['alpha_selection']['method']}), default lambda={weights.default_lambda:g}",
        f"{'model':<{width}}  global error  relative cost",
    ]
    for i, model in enumerate(weights.models):
        g = training["global_error"][model]
        lines.append(f"{model:<{width}}  {g:12.3f}  {float(weights.cost_per_1k[i]):13.4f}")
    return "\n".join(lines)

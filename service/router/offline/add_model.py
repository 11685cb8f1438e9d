"""``python -m service add-model``: append a model to existing weights from its outcomes on a small set.

Nothing is refitted: the centroids, the other models' errors and costs stay bit for bit, so routing
among the old models does not change. The new model's error on cluster ``c`` is estimated as ``fit``
does it (``estimate.py``)::

    error[new, c] = (wrong[c] + alpha * prior[c]) / (n[c] + alpha)

over the validation prompts whose nearest centroid is ``c``. ``prior[c]`` mixes the new model's per-task
error rates by the cluster's training task counts (recorded in the weights) when the validation rows
name those tasks, else it is the new model's overall error rate; ``alpha`` defaults to the strength
the weights were fitted with. Its cost is given in the weights' own unit, or as USD list prices that
are converted the way ``fit`` converted the others (same blend, same reference price).
"""

from __future__ import annotations

import argparse
import copy
import math
import sys
from collections.abc import Mapping, Sequence
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeGuard

import numpy as np

from service.router.offline.costs import COST_UNIT, COST_UNIT_ROWS, INPUT_PRICE_WEIGHT, OUTPUT_PRICE_WEIGHT
from service.router.offline.data import DataError, LabelledSet, load_labelled, load_prices, require_outcomes
from service.router.offline.estimate import cluster_error, global_error, task_mix_prior, task_rates
from service.router.offline.fit import assign_clusters, recorded_fit, weights_text_mode
from service.router.offline.options import prices_file
from service.router.weights import (
    RouterWeights,
    WeightsError,
    check_embedder,
    default_weights_path,
    load_weights,
    save_weights,
)


def new_model_errors(
    weights: RouterWeights,
    embeddings: np.ndarray,
    correct: np.ndarray,
    tasks: Sequence[str],
    alpha: float,
) -> np.ndarray:
    """``[K]`` float32 per-cluster error of the new model (``correct`` ``[N]``, NaN = no outcome)."""
    outcomes = np.asarray(correct, dtype=np.float64).reshape(-1, 1)
    if embeddings.shape != (outcomes.shape[0], weights.dim):
        raise ValueError(f"embeddings must be [{outcomes.shape[0]}, {weights.dim}]; got {embeddings.shape}")
    k = weights.num_clusters
    assign = assign_clusters(embeddings, weights.centroids)
    prior = _task_prior(weights, outcomes, tasks)
    if prior is None:
        prior = np.broadcast_to(global_error(outcomes), (k, 1)).copy()
    return cluster_error(assign, outcomes, k, alpha, prior)[0]


def _task_prior(weights: RouterWeights, outcomes: np.ndarray, tasks: Sequence[str]) -> np.ndarray | None:
    """``[K, 1]`` the task-mix prior, or None when the weights were fitted on the global prior (``fit`` records the
    task counts either way), record no tasks, or no validation row with an outcome names one of them."""
    if recorded_fit(weights).get("prior", "task") != "task":
        return None
    counts_by_task = recorded_task_counts(weights)
    names = list(counts_by_task)
    observed = ~np.isnan(outcomes[:, 0])
    known = [t in counts_by_task and bool(seen) for t, seen in zip(tasks, observed, strict=True)]
    if len(names) < 2 or not any(known):
        return None
    rows = np.flatnonzero(known)
    task_ids = np.array([names.index(t) for t, seen in zip(tasks, known, strict=True) if seen], dtype=np.int64)
    # Tasks without validation rows get the new model's overall rate over the rows that name a task.
    rates = task_rates(task_ids, outcomes[rows], len(names))
    counts = np.array([counts_by_task[name] for name in names], dtype=np.float64).T  # [K, T]
    return task_mix_prior(counts, rates, global_error(outcomes))


def recorded_task_counts(weights: RouterWeights) -> dict[str, list[float]]:
    """``{task: [K] training rows per cluster}`` as ``fit`` recorded them (``{}`` when absent); a malformed
    record is a :class:`WeightsError`."""
    recorded = recorded_fit(weights).get("cluster_task_counts", {})
    k = weights.num_clusters
    problem = f"the weights' metadata fit.cluster_task_counts must map each task to {k} counts >= 0"
    if not isinstance(recorded, Mapping):
        raise WeightsError(f"{problem}; got {type(recorded).__name__}")
    counts: dict[str, list[float]] = {}
    for task, row in recorded.items():
        if not (isinstance(row, list) and len(row) == k and all(_is_number(c) and c >= 0 for c in row)):
            raise WeightsError(f"{problem}; task {task!r} has {row!r:.80}")
        counts[str(task)] = [float(c) for c in row]
    return counts


def recorded_alpha(weights: RouterWeights) -> float:
    """The shrinkage strength the weights were fitted with (0 when they do not say)."""
    alpha = recorded_fit(weights).get("alpha", 0.0)
    if not (_is_number(alpha) and math.isfinite(alpha) and alpha >= 0):
        raise WeightsError(f"the weights' metadata fit.alpha must be a number >= 0; got {alpha!r}; give --alpha")
    return float(alpha)


def _is_number(value: object) -> TypeGuard[float]:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _recorded_number(weights: RouterWeights, section: str, key: str, field: str | None = None) -> float | None:
    """``metadata[section][key]`` (or ``[...][field]``) as a finite number >= 0, None when absent; anything else
    is a :class:`WeightsError`."""
    entries = weights.metadata.get(section, {})
    if not isinstance(entries, Mapping):
        raise WeightsError(f"the weights' metadata {section!r} must be a JSON object; got {type(entries).__name__}")
    if key not in entries:
        return None
    value = entries[key]
    where = f"{section}.{key}"
    if field is not None:
        value = value.get(field) if isinstance(value, Mapping) else None
        where += f".{field}"
    if not (_is_number(value) and math.isfinite(value) and value >= 0):
        raise WeightsError(f"the weights' metadata {where} must be a number >= 0; got {value!r}")
    return float(value)


def relative_cost_from_prices(weights: RouterWeights, input_usd: float, output_usd: float) -> float:
    """USD list prices per 1k -> the weights' relative unit: the same blend, divided by the same reference."""
    if weights.metadata.get("cost_unit") != COST_UNIT:
        raise ValueError("these weights' costs are not relative list prices; give --cost-per-1k in their unit")
    w_in = _recorded_number(weights, "cost_blend", "input_weight")
    w_out = _recorded_number(weights, "cost_blend", "output_weight")
    w_in = INPUT_PRICE_WEIGHT if w_in is None else w_in
    w_out = OUTPUT_PRICE_WEIGHT if w_out is None else w_out
    if w_in + w_out <= 0:
        raise WeightsError(f"the weights' metadata cost_blend has no positive weight: {w_in}, {w_out}")
    blended = (w_in * input_usd + w_out * output_usd) / (w_in + w_out)
    return blended / reference_price(weights)


def reference_price(weights: RouterWeights) -> float:
    """The blended USD price that cost 1.0 stands for, from any priced model: ``blended / cost_per_1k``."""
    for i, model in enumerate(weights.models):
        cost = float(weights.cost_per_1k[i])
        blended = _recorded_number(weights, "price_usd_per_1k", model, "blended")
        if blended is not None and cost > 0:
            return blended / cost
    raise ValueError("the weights record no list price to convert USD prices with; give --cost-per-1k")


def append_model(
    weights: RouterWeights, name: str, errors: np.ndarray, cost: float, provenance: Mapping[str, Any]
) -> RouterWeights:
    """The same weights with one more model (last): old tensors copied unchanged, one row and one cost added."""
    if name in weights.models:
        raise ValueError(f"model {name!r} is already in the weights")
    if errors.shape != (weights.num_clusters,):
        raise ValueError(f"errors must be [{weights.num_clusters}]; got {errors.shape}")
    if not (np.isfinite(cost) and cost >= 0):
        raise ValueError(f"cost must be finite and >= 0; got {cost}")
    metadata = copy.deepcopy(dict(weights.metadata))
    added = metadata.setdefault("added_models", [])
    if not isinstance(added, list):
        raise WeightsError(f"the weights' metadata 'added_models' must be a JSON list; got {type(added).__name__}")
    added.append({"model": name, **provenance})
    extended = replace(
        weights,
        models=(*weights.models, name),
        expected_error=np.vstack([weights.expected_error, errors[None, :].astype(np.float32)]),
        cost_per_1k=np.append(weights.cost_per_1k, np.float32(cost)),
        metadata=metadata,
    )
    extended.validate()
    return extended


def add_model_main(args: argparse.Namespace) -> int:
    """Load, embed, estimate, append, save; returns the process exit code."""
    from service.router.offline.fit import embed_prompts

    source: Path = args.weights or default_weights_path()
    try:
        weights = load_weights(source)
        if args.model in weights.models:  # before the minutes of embedding
            raise DataError(f"model {args.model!r} is already in the weights")
        labelled = load_labelled(args.data, text_mode=weights_text_mode(weights), price_models=(args.model,))
        require_outcomes(labelled, (args.model,))
        column = labelled.models.index(args.model)
        cost, cost_note = _new_cost(args, weights, labelled, column)
        vectors, embedder_id, embedder_sha256 = embed_prompts(
            labelled.texts, cache=args.embedding_cache, progress=not args.no_progress
        )
        check_embedder(weights, embedder_id, embedder_sha256, source=str(args.weights or default_weights_path()))
        alpha = float(args.alpha) if args.alpha is not None else recorded_alpha(weights)
        errors = new_model_errors(weights, vectors, labelled.correct[:, column], labelled.task, alpha)
        extended = append_model(weights, args.model, errors, cost, _provenance(labelled, column, alpha, cost_note))
        save_weights(extended, args.out)
    except (DataError, WeightsError, ValueError, OSError) as exc:
        print(f"add-model failed: {exc}", file=sys.stderr)
        return 1
    observed = int((~np.isnan(labelled.correct[:, column])).sum())
    print(f"wrote {args.out} ({extended.version}): {args.model} appended to {weights.version}")
    print(f"{observed} outcomes, error {float(global_error(labelled.correct[:, [column]])[0]):.3f}, alpha {alpha:g}")
    print(f"cost_per_1k {cost:.4f} ({cost_note})")
    return 0


def relative_cost_from_rows(weights: RouterWeights, labelled: LabelledSet, column: int) -> float:
    """Observed USD per call -> the weights' relative unit, for weights whose costs are observed costs: the new model's
    mean cost against a model of the weights on the same rows, times that model's relative cost. On the same
    rows, so that the prompts' lengths cancel out; the weights' recorded training means came from other prompts
    (an mbpp-only file made a model 54 % dearer than fitting it with the rest did). The reference is the model
    costed on the most rows beside the new one (the first in the weights on a tie)."""
    if weights.metadata.get("cost_unit") != COST_UNIT_ROWS:
        raise ValueError("these weights' costs are list prices; give --price-usd or --cost-per-1k")
    new = labelled.cost_usd[:, column]
    best: tuple[int, float] | None = None  # (shared rows, the estimate)
    for model, relative in zip(weights.models, weights.cost_per_1k, strict=True):
        if relative <= 0 or model not in labelled.models:
            continue
        reference = labelled.cost_usd[:, labelled.models.index(model)]
        both = ~np.isnan(new) & ~np.isnan(reference)
        shared = int(both.sum())
        if shared and reference[both].sum() > 0 and (best is None or shared > best[0]):
            best = (shared, float(relative) * float(new[both].mean()) / float(reference[both].mean()))
    if best is not None:
        return best[1]
    raise ValueError(
        "no model of the weights has observed costs on the same rows as the new one to compare with; give --cost-per-1k"
    )


def _new_cost(
    args: argparse.Namespace, weights: RouterWeights, labelled: LabelledSet, column: int
) -> tuple[float, str]:
    """The new model's cost: given, from USD prices (flag or prices file), or from its observed per-row costs."""
    if args.cost_per_1k is not None:
        return float(args.cost_per_1k), "given"
    if args.price_usd is not None:
        return relative_cost_from_prices(weights, *args.price_usd), "from the given USD list prices"
    if weights.metadata.get("cost_unit") == COST_UNIT_ROWS:
        return relative_cost_from_rows(weights, labelled, column), "from its observed per-row costs"
    prices_path = prices_file(args)
    if prices_path is not None:
        prices = load_prices(prices_path)
        if args.model in prices:
            return relative_cost_from_prices(weights, *prices[args.model]), f"from {prices_path.name}"
    raise ValueError(f"no cost for {args.model!r}: give --cost-per-1k, --price-usd, or a prices file that names it")


def _provenance(labelled: LabelledSet, column: int, alpha: float, cost_note: str) -> dict[str, Any]:
    return {
        "files": labelled.sources_json(),
        "outcomes_observed": int((~np.isnan(labelled.correct[:, column])).sum()),
        "error": float(global_error(labelled.correct[:, [column]])[0]),
        "alpha": alpha,
        "cost": cost_note,
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }

"""The routing rule, pure and vectorised over a batch of requests.

For a request in cluster ``c`` with trade-off ``lambda`` and candidate set ``A``::

    score[m] = expected_error[m, c] + lambda * cost_per_1k[m]        for m in A
    selected = argmin_m score[m]      ties: the cheaper model, then the smaller model id

Ties are broken without extra work: models are kept in (cost, id) order, so ``argmin``'s first
minimum is already the cheaper one.

``score_one`` is the rule for one request in Python floats (``verdict`` adds the names an answer shows), which the
server runs for every answer, batched or not: for a dozen models numpy's per-call overhead costs more than the
arithmetic. ``score_batch`` is the same rule vectorised over many requests (numpy), the reference the tests hold
``score_one`` to and the form offline checks use; both do the same IEEE double operations in the same order, so
they agree bit for bit (tests/unit/test_scoring.py checks it).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np


@dataclass(frozen=True)
class ScoreTable:
    """The weights' error and cost arrays, reordered by (cost, model id) for tie-breaking."""

    models: tuple[str, ...]
    error_by_cluster: np.ndarray  # [K, M] float64: one contiguous row per cluster
    cost: np.ndarray  # [M] float64
    error_rows: tuple[tuple[float, ...], ...]  # the same numbers as Python floats, for score_one
    cost_values: tuple[float, ...]

    @classmethod
    def build(cls, models: tuple[str, ...], expected_error: np.ndarray, cost_per_1k: np.ndarray) -> ScoreTable:
        order = sorted(range(len(models)), key=lambda m: (float(cost_per_1k[m]), models[m]))
        error_by_cluster = np.ascontiguousarray(expected_error[order].T, dtype=np.float64)
        cost = np.asarray(cost_per_1k[order], dtype=np.float64)
        return cls(
            models=tuple(models[m] for m in order),
            error_by_cluster=error_by_cluster,
            cost=cost,
            error_rows=tuple(tuple(row) for row in error_by_cluster.tolist()),
            cost_values=tuple(cost.tolist()),
        )

    def model_index(self) -> dict[str, int]:
        return {name: i for i, name in enumerate(self.models)}


@dataclass(frozen=True)
class Selection:
    """Per request: chosen column, its error and score, and every candidate's score (inf = excluded)."""

    chosen: np.ndarray  # [B] int
    expected_error: np.ndarray  # [B]
    score: np.ndarray  # [B]
    all_scores: np.ndarray  # [B, M]


def score_batch(table: ScoreTable, clusters: np.ndarray, lambdas: np.ndarray, allowed: np.ndarray) -> Selection:
    """Score ``B`` requests at once.

    ``clusters`` [B] int, ``lambdas`` [B] float >= 0, ``allowed`` [B, M] bool (each row has a True).
    """
    errors = table.error_by_cluster[clusters]  # [B, M]
    scores = errors + lambdas[:, None] * table.cost[None, :]
    scores = np.where(allowed, scores, np.inf)
    chosen = np.argmin(scores, axis=1)
    rows = np.arange(len(chosen))
    return Selection(
        chosen=chosen,
        expected_error=errors[rows, chosen],
        score=scores[rows, chosen],
        all_scores=scores,
    )


def score_one(table: ScoreTable, cluster: int, lam: float, columns: Sequence[int]) -> tuple[int, list[float]]:
    """``score_batch`` for one request: ``columns`` are the allowed models' columns, ascending. Returns the
    position in ``columns`` of the chosen model (the first minimum: the cheaper one on ties) and the score of
    every allowed model, in ``columns`` order."""
    errors = table.error_rows[cluster]
    cost = table.cost_values
    scores = [errors[m] + lam * cost[m] for m in columns]
    return min(range(len(scores)), key=scores.__getitem__), scores


class Verdict(NamedTuple):
    """One request's outcome on its cluster, as an answer shows it."""

    selected: str
    expected_error: float
    score: float
    all_scores: dict[str, float]  # every candidate's score by name; answers may share it, so never mutated


def verdict(table: ScoreTable, cluster: int, lam: float, columns: Sequence[int]) -> Verdict:
    """``score_one`` with the chosen model's name, error and score, and every candidate's score by name."""
    best, scores = score_one(table, cluster, lam, columns)
    chosen, models = columns[best], table.models
    all_scores = {models[m]: score for m, score in zip(columns, scores, strict=True)}
    return Verdict(models[chosen], table.error_rows[cluster][chosen], scores[best], all_scores)

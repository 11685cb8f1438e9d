"""The routing rule, pure and vectorised over a batch of requests.

For a request in cluster ``c`` with trade-off ``lambda`` and candidate set ``A``::

    score[m] = expected_error[m, c] + lambda * cost_per_1k[m]        for m in A
    selected = argmin_m score[m]      ties: the cheaper model, then the smaller model id

Ties are broken without extra work: models are kept in (cost, id) order, so ``argmin``'s first
minimum is already the cheaper one.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class ScoreTable:
    """The weights' error and cost arrays, reordered by (cost, model id) for tie-breaking."""

    models: tuple[str, ...]
    error_by_cluster: np.ndarray  # [K, M] float64: one contiguous row per cluster
    cost: np.ndarray  # [M] float64

    @classmethod
    def build(cls, models: tuple[str, ...], expected_error: np.ndarray, cost_per_1k: np.ndarray) -> ScoreTable:
        order = sorted(range(len(models)), key=lambda m: (float(cost_per_1k[m]), models[m]))
        return cls(
            models=tuple(models[m] for m in order),
            error_by_cluster=np.ascontiguousarray(expected_error[order].T, dtype=np.float64),
            cost=np.asarray(cost_per_1k[order], dtype=np.float64),
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

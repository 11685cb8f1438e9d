"""The outcomes an evaluation is scored on, and the baselines every router is compared with.

All curves are normalised by the mean realised cost of the *reference* model: the most accurate
single model on these prompts (ties: the cheaper, then the first), which therefore sits at cost 1.

- ``oracle``: per prompt, the cheapest model that answered correctly (the cheapest model when none
  did); swept like a router over ``error = 1 - correct`` with each prompt's own costs, so its curve
  also has the cheaper, less accurate points.
- ``random mix``: send a random share of prompts to the reference model and the rest to the cheapest
  model; its curve is the segment between the two single-model points.
- each single model: one point (its mean cost, its accuracy).
- ``single-model envelope``: the deferral curve through all single-model points.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from service.router.offline.evaluation import MAX_LAMBDAS, Curve, curve_from_points, lambda_breakpoints, routed_points

ORACLE = "oracle"
RANDOM_MIX = "random mix (cheapest + most accurate)"
SINGLE_ENVELOPE = "single-model envelope"


# eq=False: ndarray fields make field-wise == ambiguous.
@dataclass(frozen=True, eq=False)
class Outcomes:
    """Outcomes of ``M`` models on ``N`` prompts, every cell observed."""

    models: tuple[str, ...]
    correct: np.ndarray  # [N, M] in [0, 1]
    cost: np.ndarray  # [N, M] realised cost per prompt (any unit: only ratios matter)

    def __post_init__(self) -> None:
        n_m = (self.correct.shape[0], len(self.models))
        if self.correct.shape != n_m or self.cost.shape != n_m:
            raise ValueError(f"correct and cost must be [N, M] = {n_m}; got {self.correct.shape}, {self.cost.shape}")
        if self.correct.shape[0] == 0:
            raise ValueError("no prompts to evaluate on (one is scored where every model has an outcome and a cost)")
        if not (np.isfinite(self.correct).all() and np.isfinite(self.cost).all()):
            raise ValueError("outcomes and costs must be observed (finite) for every prompt and model")

    @property
    def num_rows(self) -> int:
        return int(self.correct.shape[0])

    @property
    def accuracy(self) -> np.ndarray:
        return np.asarray(self.correct.mean(axis=0), dtype=np.float64)

    @property
    def mean_cost(self) -> np.ndarray:
        return np.asarray(self.cost.mean(axis=0), dtype=np.float64)

    @property
    def reference(self) -> int:
        """The most accurate model; ties go to the cheaper, then to the first."""
        return int(np.lexsort((np.arange(len(self.models)), self.mean_cost, -self.accuracy))[0])

    @property
    def cheapest(self) -> int:
        return int(np.argmin(self.mean_cost))

    @property
    def reference_cost(self) -> float:
        cost = float(self.mean_cost[self.reference])
        if cost <= 0:
            raise ValueError(f"the most accurate model ({self.models[self.reference]}) has no cost to normalise by")
        return cost

    @property
    def target_accuracy(self) -> float:
        return float(self.accuracy[self.reference])


def observed_rows(correct: np.ndarray, cost: np.ndarray) -> np.ndarray:
    """``[N]`` bool: rows where every model has an outcome and a cost (the rest cannot be scored for all)."""
    return np.asarray(np.isfinite(correct).all(axis=1) & np.isfinite(cost).all(axis=1))


def system_curve(
    outcomes: Outcomes, expected_error: np.ndarray, route_cost: np.ndarray, max_lambdas: int = MAX_LAMBDAS
) -> Curve:
    """The deferral curve of a system routing by ``expected_error`` ``[N, M]`` and ``route_cost`` (``[M]`` or
    ``[N, M]``), swept over every lambda that changes a decision."""
    if expected_error.shape != outcomes.correct.shape:
        raise ValueError(f"expected_error must be {outcomes.correct.shape}; got {expected_error.shape}")
    lambdas = lambda_breakpoints(expected_error, route_cost, max_lambdas)
    cost, accuracy = routed_points(expected_error, route_cost, outcomes.correct, outcomes.cost, lambdas)
    return curve_from_points(cost / outcomes.reference_cost, accuracy)


def oracle_curve(outcomes: Outcomes) -> Curve:
    return system_curve(outcomes, 1.0 - outcomes.correct, outcomes.cost)


def single_model_curves(outcomes: Outcomes) -> dict[str, Curve]:
    cost = outcomes.mean_cost / outcomes.reference_cost
    return {name: curve_from_points(cost[[m]], outcomes.accuracy[[m]]) for m, name in enumerate(outcomes.models)}


def points_curve(outcomes: Outcomes, models: Sequence[int]) -> Curve:
    """The deferral curve through the single-model points of ``models``."""
    index = np.asarray(models, dtype=np.int64)
    return curve_from_points(outcomes.mean_cost[index] / outcomes.reference_cost, outcomes.accuracy[index])


def baseline_curves(outcomes: Outcomes) -> dict[str, Curve]:
    """Oracle, random mix, single-model envelope, then each single model (by name)."""
    return {
        ORACLE: oracle_curve(outcomes),
        RANDOM_MIX: points_curve(outcomes, [outcomes.cheapest, outcomes.reference]),
        SINGLE_ENVELOPE: points_curve(outcomes, range(len(outcomes.models))),
        **single_model_curves(outcomes),
    }

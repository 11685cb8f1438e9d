"""Quality-cost metrics of a router: deferral curves, AUDC, QNC, accuracy at a cost budget.

A *system* is a per-prompt table ``expected_error[N, M]`` plus the cost it routes by (``[M]``, or
``[N, M]`` for per-prompt costs). For a trade-off ``lambda`` it sends prompt ``i`` to::

    choice[i] = argmin_m expected_error[i, m] + lambda * route_cost[i, m]   (ties: the cheaper, then lower m)

which is the service's rule (:mod:`service.router.scoring`). Each ``lambda`` gives one point:

    cost(lambda)     = mean_i realised_cost[i, choice[i]] / reference_cost
    accuracy(lambda) = mean_i correct[i, choice[i]]

where ``reference_cost`` is the mean realised cost of the most accurate single model on the same
prompts (so that model sits at cost 1). Sweeping ``lambda`` over 0 and every value at which some
prompt's choice changes traces all the system's points.

The *deferral curve* is the non-decreasing upper convex hull of the points (a random mix of two
routers reaches any point on the segment between them), flat to the right of its most accurate
point and 0 to the left of its cheapest. From it:

- ``AUDC`` = mean of the curve on ``AUDC_GRID_POINTS`` evenly spaced costs in ``[0, 1]``;
- ``QNC`` = the smallest cost at which the curve reaches the most accurate single model's accuracy
  (``inf`` if it never does);
- ``accuracy@x`` = the curve at cost ``x`` (e.g. ``x = 0.1``: a tenth of the best model's cost).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

AUDC_GRID_POINTS = 1001
BUDGETS: tuple[float, ...] = (0.05, 0.10, 0.25, 0.50)
# More distinct lambdas than this are thinned to evenly spaced quantiles (the oracle's per-prompt
# costs give ~N * M^2 / 2 breakpoints; the points they add are too close together to matter).
MAX_LAMBDAS = 4000
# Far above float64 rounding of a breakpoint (1e-16 relative), far below the gap between two distinct breakpoints.
BREAKPOINT_NUDGE = 1e-9
# Score cells ([lambdas, prompts, models]) evaluated at once by routed_points: bounds its memory (~32 MB).
CHUNK_CELLS = 1 << 22
# Envelope values and accuracies are compared with this slack, so float noise neither hides a
# point nor makes the curve miss a target it meets exactly.
ACCURACY_TOLERANCE = 1e-12
# Normalised costs are means of realised costs divided by another mean, so a model that costs exactly a
# tenth of the reference can land at 0.1 + 1 ulp; a point this close to a budget (or a grid cost) counts
# as reached, so acc@10% and the AUDC do not depend on summation order or on the number of rows.
COST_TOLERANCE = 1e-9


@dataclass(frozen=True)
class Curve:
    """Points of one system and their deferral curve (costs already normalised)."""

    cost: np.ndarray  # [P] every point's normalised cost
    accuracy: np.ndarray  # [P]
    hull_cost: np.ndarray  # [H] vertices of the envelope, increasing cost and accuracy
    hull_accuracy: np.ndarray  # [H]


@dataclass(frozen=True)
class CurveMetrics:
    audc: float
    qnc: float  # inf when the curve never reaches the target accuracy
    accuracy_at: Mapping[float, float] = field(default_factory=dict)
    max_accuracy: float = math.nan

    def as_dict(self) -> dict[str, float | None]:
        """JSON-friendly: ``inf`` becomes ``None``."""
        out: dict[str, float | None] = {
            "audc": self.audc,
            "qnc": self.qnc if math.isfinite(self.qnc) else None,
            "max_accuracy": self.max_accuracy,
        }
        out.update({f"acc@{budget:g}": value for budget, value in self.accuracy_at.items()})
        return out


# --- routing and points ----------------------------------------------------------------------


def chosen_columns(error: np.ndarray, cost: np.ndarray, lambdas: np.ndarray) -> np.ndarray:
    """``[L, N]`` chosen column per lambda and row: ``argmin(error + lambda * cost)``, ties to the cheaper, then
    the lower index. Columns are the weights' models, which weights keep sorted by name, so this is the service's
    rule (``scoring.ScoreTable``: cost, then model id)."""
    score = error[None] + lambdas[:, None, None] * cost[None]  # [L, N, M]
    best = score.min(axis=2, keepdims=True)
    return np.argmin(np.where(score <= best, cost[None], np.inf), axis=2)


def lambda_breakpoints(
    expected_error: np.ndarray, route_cost: np.ndarray, max_lambdas: int = MAX_LAMBDAS
) -> np.ndarray:
    """Sorted lambdas covering every distinct routing decision: 0 and each ``lambda > 0`` at which a row's
    choice can change, ``(e[a] - e[b]) / (c[b] - c[a])`` for pairs with ``c[a] < c[b]`` and ``e[a] > e[b]``.

    At a breakpoint the tie goes to the cheaper model, which is also the choice just above it; but in floating
    point the two scores at a computed breakpoint often differ in their last bit, leaving the dearer model chosen
    there, so each breakpoint is also evaluated a relative ``BREAKPOINT_NUDGE`` above it: together they visit every
    policy (the cheapest one above the largest breakpoint included). More than ``max_lambdas`` are thinned to evenly
    spaced quantiles (0 and the largest are kept).
    """
    error = np.asarray(expected_error, dtype=np.float64)
    cost = np.broadcast_to(np.asarray(route_cost, dtype=np.float64), error.shape)
    rows = np.unique(np.concatenate([error, cost], axis=1), axis=0)
    m = error.shape[1]
    e, c = rows[:, :m], rows[:, m:]
    de = e[:, :, None] - e[:, None, :]  # e[a] - e[b]
    dc = c[:, None, :] - c[:, :, None]  # c[b] - c[a]
    valid = (dc > 0) & (de > 0)
    found = de[valid] / dc[valid]
    found = found[found > 0]
    lambdas = np.unique(np.concatenate([[0.0], found, found * (1 + BREAKPOINT_NUDGE)]))
    if lambdas.size > max_lambdas:
        keep = np.unique(np.round(np.linspace(0, lambdas.size - 1, max_lambdas)).astype(np.int64))
        lambdas = lambdas[keep]
    return lambdas


def routed_points(
    expected_error: np.ndarray,
    route_cost: np.ndarray,
    correct: np.ndarray,
    realised_cost: np.ndarray,
    lambdas: Sequence[float] | np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """``(mean realised cost, mean accuracy)`` of the routed choices, one pair per lambda (costs not normalised).

    Vectorised over lambdas in chunks of about ``CHUNK_CELLS`` score cells (:func:`chosen_columns`).
    """
    error = np.asarray(expected_error, dtype=np.float64)
    cost = np.broadcast_to(np.asarray(route_cost, dtype=np.float64), error.shape)
    lams = np.asarray(lambdas, dtype=np.float64)
    rows = np.arange(error.shape[0])[None, :]
    step = max(1, CHUNK_CELLS // max(error.size, 1))
    costs, accs = [], []
    for start in range(0, lams.size, step):
        chosen = chosen_columns(error, cost, lams[start : start + step])
        costs.append(realised_cost[rows, chosen].mean(axis=1))
        accs.append(correct[rows, chosen].mean(axis=1))
    return np.concatenate(costs), np.concatenate(accs)


# --- the curve and its numbers ---------------------------------------------------------------


def upper_envelope(cost: np.ndarray, accuracy: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Vertices of the non-decreasing upper convex hull, from the cheapest point (the most accurate among
    equally cheap ones) to the most accurate point (the cheapest among equally accurate ones)."""
    x = np.asarray(cost, dtype=np.float64)
    y = np.asarray(accuracy, dtype=np.float64)
    if x.size == 0 or x.shape != y.shape:
        raise ValueError(f"need matching, non-empty cost and accuracy arrays; got {x.shape} and {y.shape}")
    order = np.lexsort((-y, x))
    x, y = x[order], y[order]
    top = int(np.argmax(y))  # first maximum in cost order = the cheapest most accurate point
    hull: list[tuple[float, float]] = []
    for px, py in zip(x[: top + 1], y[: top + 1], strict=True):
        if hull and px == hull[-1][0]:
            continue  # same cost, lower (or equal) accuracy
        if hull and py <= hull[-1][1]:
            continue  # costs more and is no better: never on a non-decreasing hull
        while len(hull) >= 2 and _cross(hull[-2], hull[-1], (px, py)) >= 0:
            hull.pop()  # hull[-1] lies on or below the segment hull[-2] -> (px, py)
        hull.append((float(px), float(py)))
    hx, hy = zip(*hull, strict=True)
    return np.array(hx), np.array(hy)


def _cross(o: tuple[float, float], a: tuple[float, float], b: tuple[float, float]) -> float:
    """z of (a - o) x (b - o): > 0 when ``b`` is left of (above) the ray o -> a."""
    return (a[0] - o[0]) * (b[1] - o[1]) - (a[1] - o[1]) * (b[0] - o[0])


def envelope_at(hull_cost: np.ndarray, hull_accuracy: np.ndarray, x: np.ndarray | float) -> np.ndarray:
    """The curve at cost(s) ``x``: 0 left of the first vertex, linear between vertices, flat after the last
    (a cost within ``COST_TOLERANCE`` of the first vertex reaches it)."""
    xs = np.atleast_1d(np.asarray(x, dtype=np.float64))
    values = np.interp(xs, hull_cost, hull_accuracy)  # flat beyond both ends
    return np.where(xs < hull_cost[0] - COST_TOLERANCE, 0.0, values)


def audc(hull_cost: np.ndarray, hull_accuracy: np.ndarray, grid_points: int = AUDC_GRID_POINTS) -> float:
    """Mean of the curve over ``grid_points`` evenly spaced costs in ``[0, 1]`` (both ends included)."""
    return float(envelope_at(hull_cost, hull_accuracy, np.linspace(0.0, 1.0, grid_points)).mean())


def qnc(hull_cost: np.ndarray, hull_accuracy: np.ndarray, target: float) -> float:
    """Smallest cost at which the curve reaches ``target`` accuracy; ``inf`` if it never does."""
    reach = np.flatnonzero(hull_accuracy >= target - ACCURACY_TOLERANCE)
    if reach.size == 0:
        return math.inf
    j = int(reach[0])
    if j == 0:
        return float(hull_cost[0])
    x0, x1 = hull_cost[j - 1], hull_cost[j]
    y0, y1 = hull_accuracy[j - 1], hull_accuracy[j]
    return float(x0 + (target - y0) * (x1 - x0) / (y1 - y0))


def curve_from_points(cost: np.ndarray, accuracy: np.ndarray) -> Curve:
    hx, hy = upper_envelope(cost, accuracy)
    return Curve(cost=np.asarray(cost, float), accuracy=np.asarray(accuracy, float), hull_cost=hx, hull_accuracy=hy)


def curve_metrics(curve: Curve, target: float, budgets: Sequence[float] = BUDGETS) -> CurveMetrics:
    at = envelope_at(curve.hull_cost, curve.hull_accuracy, np.array(budgets, dtype=np.float64))
    return CurveMetrics(
        audc=audc(curve.hull_cost, curve.hull_accuracy),
        qnc=qnc(curve.hull_cost, curve.hull_accuracy, target),
        accuracy_at={float(b): float(v) for b, v in zip(budgets, at, strict=True)},
        max_accuracy=float(curve.hull_accuracy[-1]),
    )

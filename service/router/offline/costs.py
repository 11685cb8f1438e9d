"""Model costs as the router trades them off: relative list prices, or relative observed costs.

``cost_per_1k[m]`` in the weights is one of (the unit string goes into the weights' metadata):

- list prices: ``blended[m] = (3 * input[m] + 1 * output[m]) / 4`` USD per 1k tokens, divided by the
  largest, so the most expensive model costs 1.0;
- observed costs (``fit --costs rows``): the mean observed USD per call, divided by the largest.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from service.router.offline.estimate import RoutingCosts

# Typical chat traffic reads more than it writes: blend list prices 3 input : 1 output.
INPUT_PRICE_WEIGHT = 3.0
OUTPUT_PRICE_WEIGHT = 1.0
COST_UNIT = "relative blended list price per 1k tokens (3:1 input:output), most expensive model = 1.0"
COST_UNIT_ROWS = "relative mean observed cost per call (USD), most expensive model = 1.0"


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


def observed_cost_per_call(cost_usd: np.ndarray) -> np.ndarray:
    """``[M]`` mean observed USD per call over the rows that have every model's cost: models compared on the same
    prompts (a model whose cost was recorded only on short prompts would otherwise look cheap). Needs such a row
    (``require_observed_costs``)."""
    return cost_usd[~np.isnan(cost_usd).any(axis=1)].mean(axis=0)


def absolute_costs(
    models: Sequence[str], cost_usd: np.ndarray, prices: Mapping[str, tuple[float, float]] | None
) -> np.ndarray:
    """``[M]`` what routing trades off, in USD: blended list prices when ``prices`` are given, else the mean
    observed cost per call of each model (``relative_costs`` turns either into the weights' unit)."""
    if prices is not None:
        return blended_prices(models, prices)
    require_observed_costs(models, cost_usd)
    return observed_cost_per_call(cost_usd)


def require_observed_costs(models: Sequence[str], cost_usd: np.ndarray, where: str = "the labelled rows") -> None:
    """Costs from the rows (``--costs rows``) need at least one observed cost per model (a ValueError names the models
    without one) and a row with every model's cost, where ``observed_cost_per_call`` compares them."""
    observed = ~np.isnan(cost_usd)
    missing = [m for m, seen in zip(models, observed.any(axis=0), strict=True) if not seen]
    if missing:
        raise ValueError(
            f"--costs rows needs a per-row cost of every model, but {where} have none for "
            f"{', '.join(map(repr, missing))} (no '<model>|total_cost' column, or every cell empty)"
        )
    if not observed.all(axis=1).any():
        raise ValueError(
            f"--costs rows compares the models' costs on the same prompts, but none of {where} has a cost for "
            "every model"
        )


def has_observed_costs(cost_usd: np.ndarray) -> bool:
    """Every model has at least one observed per-row cost."""
    return bool((~np.isnan(cost_usd)).any(axis=0).all())


def realised_costs(cost_usd: np.ndarray, route_cost: np.ndarray | None) -> np.ndarray:
    """``[N, M]`` what each call costs when a routed choice is scored: its observed cost when every model has
    some, else the model's ``route_cost`` on every row."""
    if has_observed_costs(cost_usd):
        return np.asarray(cost_usd, dtype=np.float64)
    if route_cost is None:
        raise ValueError("the labelled data lacks per-row costs for some models and no prices were given")
    return np.broadcast_to(np.asarray(route_cost, dtype=np.float64), cost_usd.shape).copy()


def routing_costs(cost_usd: np.ndarray, route_cost: np.ndarray, models: Sequence[str] = ()) -> RoutingCosts:
    """Costs for choosing alpha by AUDC: route by ``route_cost``, score at ``realised_costs``."""
    return RoutingCosts(
        route=np.asarray(route_cost, dtype=np.float64),
        realised=realised_costs(cost_usd, route_cost),
        models=tuple(models),
    )

"""The router's immutable serving state and the holder that swaps it atomically on reload.

A request reads ``holder.current()`` once and uses that snapshot to the end, so a reload in the
middle of a request can never mix one file's centroids with another's error table.
"""

from __future__ import annotations

import functools
import itertools
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from service.router.index import CentroidSearch, build_index
from service.router.scoring import ScoreTable, Verdict, verdict
from service.router.weights import RouterWeights

if TYPE_CHECKING:
    from service.router.kernels import RouterKernels

_generations = itertools.count(1)


@dataclass(frozen=True)
class RouterState:
    weights: RouterWeights
    index: CentroidSearch
    table: ScoreTable
    model_index: dict[str, int]
    generation: int = field(default_factory=lambda: next(_generations))

    @classmethod
    def build(
        cls,
        weights: RouterWeights,
        *,
        index_backend: str = "auto",
        device: str = "cpu",
        kernels: RouterKernels | None = None,
    ) -> RouterState:
        """Everything derived from a validated weights file, built before it is swapped in (the torch
        index backend on ``device``; see ``index.build_index``)."""
        table = ScoreTable.build(weights.models, weights.expected_error, weights.cost_per_1k)
        state = cls(
            weights=weights,
            index=build_index(weights.centroids, backend=index_backend, device=device, kernels=kernels),
            table=table,
            model_index=table.model_index(),
        )
        state.default_verdicts  # noqa: B018 - scored now, not by the first requests after a swap
        return state

    def allowed_columns(self, available: list[str] | None) -> tuple[int, ...]:
        """The candidates' columns in the score table, ascending (its (cost, id) order)."""
        if available is None:
            return self.table_columns
        return tuple(sorted(self.model_index[name] for name in available))

    @functools.cached_property
    def table_columns(self) -> tuple[int, ...]:
        return tuple(range(len(self.table.models)))

    @functools.cached_property
    def default_verdicts(self) -> tuple[Verdict, ...]:
        """Each cluster's verdict for the query most requests make (the weights' lambda, every model): scored
        once per weights instead of once per answer on the spot."""
        lam, columns = self.weights.default_lambda, self.table_columns
        return tuple(verdict(self.table, cluster, lam, columns) for cluster in range(len(self.table.error_rows)))


class StateHolder:
    """``current()`` is a plain attribute read; ``swap()`` one assignment (atomic under the GIL)."""

    def __init__(self) -> None:
        self._state: RouterState | None = None

    def current(self) -> RouterState | None:
        return self._state

    def swap(self, state: RouterState) -> RouterState | None:
        previous, self._state = self._state, state
        return previous

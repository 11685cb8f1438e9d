"""How many workers an endpoint wants: a pure function of its recent load, its workers and its settings.

    demand  = max(recent load rate, outstanding load / max_queue_time_s)     (workload units per second)
    perf    = mean max_perf of the endpoint's live workers that measured one
    wanted  = clamp(ceil(demand / (perf * target_util)), min_workers, max_workers)
    cold    = min(cold_workers, max_workers - wanted)      (stopped workers kept loaded, for quick start)

The outstanding term makes a backlog count: work already queued must drain within the queue-time budget.
With no measured perf yet, any demand asks for one worker (it will measure itself when it starts).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from enum import StrEnum
from typing import Any

from service.dispatch.endpoints import EndpointSpec
from service.dispatch.records import WorkerRecord, WorkerState
from service.dispatch.store import LoadStats


class Action(StrEnum):
    SCALE_UP = "scale_up"
    SCALE_DOWN = "scale_down"
    HOLD = "hold"


@dataclass(frozen=True, slots=True)
class ScaleDecision:
    endpoint: str
    load_rate: float
    outstanding_load: float
    demand: float
    perf_per_worker: float | None
    ready_workers: int
    starting_workers: int  # live workers still loading
    wanted_workers: int
    wanted_cold_workers: int
    action: Action

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "action": self.action.value}


def decide(
    spec: EndpointSpec, workers: Sequence[WorkerRecord], stats: LoadStats, *, now: float, heartbeat_timeout_s: float
) -> ScaleDecision:
    live = [w for w in workers if w.active(now, heartbeat_timeout_s)]
    ready = sum(w.state is WorkerState.READY for w in live)
    starting = sum(w.state is WorkerState.LOADING for w in live)
    perfs = [w.max_perf for w in live if w.max_perf > 0 and w.state in (WorkerState.READY, WorkerState.LOADING)]
    perf = sum(perfs) / len(perfs) if perfs else None
    demand = max(stats.load_rate, stats.outstanding / spec.max_queue_time_s)
    if demand <= 0:
        needed = 0
    elif perf is None:
        needed = 1
    else:
        needed = math.ceil(demand / (perf * spec.target_util))
    wanted = min(max(needed, spec.min_workers), spec.max_workers)
    cold = min(spec.cold_workers, spec.max_workers - wanted)
    have = ready + starting
    action = Action.SCALE_UP if wanted > have else Action.SCALE_DOWN if wanted < have else Action.HOLD
    return ScaleDecision(
        endpoint=spec.name,
        load_rate=stats.load_rate,
        outstanding_load=stats.outstanding,
        demand=demand,
        perf_per_worker=perf,
        ready_workers=ready,
        starting_workers=starting,
        wanted_workers=wanted,
        wanted_cold_workers=cold,
        action=action,
    )

"""How many workers an endpoint wants: a pure function of its recent load, its workers and its settings.

    demand  = max(recent load rate, (outstanding + waiting load) / max_queue_time_s)   (workload units per second)
    perf    = mean max_perf of the endpoint's live workers, ready or loading, that measured one (an errored or
              stopped worker's speed serves nothing); with none, that of every worker on record that measured one
              (cold workers about to be started: the speed they will bring)
    needed  = max(1, ceil(demand / (perf * target_util))) if demand > 0 or a request waits or is open, else 0
    wanted  = clamp(needed, min_workers, max_workers)
    cold    = min(cold_workers, max_workers - wanted)      (stopped workers kept loaded, for quick start)

The outstanding term makes a backlog count: work already queued must drain within the queue-time budget. So does
work waiting for a worker (requests answered "no ready worker" and polled within the load window): once the window
has passed, a client waiting on a cold start is the only sign of demand, and without it the decision scaled the
loading worker away. A waiting request of cost 0 still wants a worker. One its client stopped polling no longer
counts after a window (it may have been sent anew, and would count twice).
With no measured perf on record at all, any demand asks for one worker (it will measure itself when it starts); any
demand at all, or any request a live worker holds (cost-0 requests are demand no load shows), asks for at least one,
however fast
the workers (within max_workers). The ratio is rounded up after a relative slack of 1e-12: a demand that fits k
workers exactly (56.7 u/s on 7 workers of 9 at 0.9) came out as k + 1 through float rounding. A ready worker without
a positive max_perf gets no requests (picking divides by it), so it is no serving capacity: not counted as ready.
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

# demand / capacity is rounded up past this relative float error only (the quotient of two rounded numbers)
CEIL_SLACK = 1e-12


class Action(StrEnum):
    SCALE_UP = "scale_up"
    SCALE_DOWN = "scale_down"
    HOLD = "hold"


@dataclass(frozen=True, slots=True)
class ScaleDecision:
    endpoint: str
    load_rate: float
    outstanding_load: float
    waiting_requests: int
    waiting_load: float
    demand: float
    perf_per_worker: float | None
    ready_workers: int
    starting_workers: int  # live workers still loading
    wanted_workers: int
    wanted_cold_workers: int
    action: Action

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "action": self.action.value}


def measured(perf: float) -> bool:
    """A max_perf requests can be spread by: positive and finite."""
    return 0 < perf < math.inf


def mean_perf(perfs: Sequence[float]) -> float | None:
    """The mean, or None for none. A sum of large perfs can overflow to inf: then each term is divided first (only
    then: dividing first rounds every term, and six perfs of 1.0 would average 0.9999999999999999)."""
    if not perfs:
        return None
    total = sum(perfs)
    if math.isfinite(total):
        return total / len(perfs)
    return sum(perf / len(perfs) for perf in perfs)


def workers_needed(demand: float, perf: float | None, target_util: float, max_workers: int) -> int:
    """Workers that serve ``demand`` at ``target_util`` of ``perf`` each: 0 without demand, else at least 1 (a
    ratio that underflowed to 0 still has work to do), and ``max_workers`` for a ratio past any float."""
    if not demand > 0:
        return 0
    if perf is None:
        return 1
    capacity = perf * target_util  # 0.0 when a subnormal perf underflows: no finite ratio then
    ratio = demand / capacity if capacity > 0 else math.inf
    if not math.isfinite(ratio):
        return max(1, max_workers)
    return max(1, math.ceil(ratio * (1 - CEIL_SLACK)))


def decide(
    spec: EndpointSpec, workers: Sequence[WorkerRecord], stats: LoadStats, *, now: float, heartbeat_timeout_s: float
) -> ScaleDecision:
    live = [w for w in workers if w.active(now, heartbeat_timeout_s)]
    ready = sum(w.state is WorkerState.READY and measured(w.max_perf) for w in live)
    starting = sum(w.state is WorkerState.LOADING for w in live)
    perf = mean_perf(
        [w.max_perf for w in live if measured(w.max_perf) and w.state in (WorkerState.READY, WorkerState.LOADING)]
    )
    if perf is None:  # scaling up from cold: the speed of the workers on record
        perf = mean_perf([w.max_perf for w in workers if measured(w.max_perf)])
    demand = max(stats.load_rate, (stats.outstanding + stats.waiting) / spec.max_queue_time_s)
    needed = workers_needed(demand, perf, spec.target_util, spec.max_workers)
    # a request held by a worker (cost 0 shows no load) wants it kept; one whose client stopped polling does not
    if stats.waiting_requests or any(w.open_requests for w in live):
        needed = max(needed, 1)
    wanted = min(max(needed, spec.min_workers), spec.max_workers)
    cold = min(spec.cold_workers, spec.max_workers - wanted)
    have = ready + starting
    action = Action.SCALE_UP if wanted > have else Action.SCALE_DOWN if wanted < have else Action.HOLD
    return ScaleDecision(
        endpoint=spec.name,
        load_rate=stats.load_rate,
        outstanding_load=stats.outstanding,
        waiting_requests=stats.waiting_requests,
        waiting_load=stats.waiting,
        demand=demand,
        perf_per_worker=perf,
        ready_workers=ready,
        starting_workers=starting,
        wanted_workers=wanted,
        wanted_cold_workers=cold,
        action=action,
    )

"""The autoscaling decision: demand, perf per worker, clamps, cold workers, the action. Numbers worked by hand."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from service.dispatch.autoscale import Action, ScaleDecision, decide
from service.dispatch.endpoints import EndpointSpec
from service.dispatch.records import WorkerRecord, WorkerState
from service.dispatch.store import LoadStats
from tests.fakes import worker_record

NOW = 1_000_000.0
HEARTBEAT_S = 30.0


def rec(worker_id: str, **fields: Any) -> WorkerRecord:
    return worker_record(worker_id, now=NOW, **fields)


def spec(**fields: Any) -> EndpointSpec:
    return EndpointSpec(**{"name": "ep", "max_queue_time_s": 10.0, "target_util": 0.5, **fields})


def run(
    endpoint: EndpointSpec, workers: list[WorkerRecord], load_rate: float = 0.0, outstanding: float = 0.0
) -> ScaleDecision:
    return decide(endpoint, workers, LoadStats(load_rate, outstanding), now=NOW, heartbeat_timeout_s=HEARTBEAT_S)


def test_demand_from_the_load_rate() -> None:
    # perf = mean(10, 20) = 15; demand 30 u/s; 30 / (15 * 0.5) = 4 workers
    d = run(spec(), [rec("a", perf=10), rec("b", perf=20)], load_rate=30.0, outstanding=50.0)
    assert d.demand == 30.0  # the backlog term 50 / 10 = 5 is smaller
    assert d.perf_per_worker == 15.0
    assert (d.ready_workers, d.starting_workers) == (2, 0)
    assert d.wanted_workers == 4
    assert d.action is Action.SCALE_UP
    assert (d.endpoint, d.load_rate, d.outstanding_load) == ("ep", 30.0, 50.0)


def test_a_backlog_counts_as_demand() -> None:
    # outstanding 300 must drain within max_queue_time_s 10: 30 u/s, above the recent rate of 1
    d = run(spec(), [rec("a", perf=10)], load_rate=1.0, outstanding=300.0)
    assert d.demand == 30.0
    assert d.wanted_workers == 6  # 30 / (10 * 0.5)


def test_requests_waiting_for_a_worker_count_as_demand() -> None:
    """After the load window, a client polling on a cold start was no demand at all: the loading worker it waited for
    was scaled away (wanted 0, scale_down)."""
    loading = [rec("a", state=WorkerState.LOADING, perf=0)]
    waiting = decide(spec(), loading, LoadStats(0.0, 0.0, waiting_requests=1, waiting=0.0), now=NOW,
                     heartbeat_timeout_s=HEARTBEAT_S)  # fmt: skip
    assert (waiting.wanted_workers, waiting.action, waiting.waiting_requests) == (1, Action.HOLD, 1)
    assert run(spec(), loading).action is Action.SCALE_DOWN  # nobody waits: the worker may go
    # their workload drains within max_queue_time_s like a backlog: (50 + 250) / 10 = 30 u/s
    d = decide(spec(), [rec("a", perf=10)], LoadStats(1.0, 50.0, waiting_requests=3, waiting=250.0), now=NOW,
               heartbeat_timeout_s=HEARTBEAT_S)  # fmt: skip
    assert (d.demand, d.wanted_workers, d.waiting_load) == (30.0, 6, 250.0)


def test_target_util_leaves_headroom() -> None:
    workers = [rec("a", perf=10)]
    assert run(spec(target_util=1.0), workers, load_rate=30.0).wanted_workers == 3  # 30 / 10
    assert run(spec(target_util=0.5), workers, load_rate=30.0).wanted_workers == 6  # 30 / 5
    assert run(spec(target_util=1.0), workers, load_rate=30.5).wanted_workers == 4  # ceil(3.05)
    assert run(spec(target_util=1.0), workers, load_rate=0.25).wanted_workers == 1  # ceil(0.025)


def test_wanted_is_clamped_to_min_and_max() -> None:
    workers = [rec("a", perf=10)]
    assert run(spec(min_workers=3), workers).wanted_workers == 3  # no demand, but a floor of 3
    assert run(spec(min_workers=3), workers, load_rate=5.0).wanted_workers == 3  # 1 needed
    assert run(spec(max_workers=2), workers, load_rate=100.0).wanted_workers == 2  # 20 needed
    assert run(spec(min_workers=0, max_workers=0), workers, load_rate=100.0).wanted_workers == 0


@pytest.mark.parametrize(
    ("cold", "max_workers", "load_rate", "wanted", "wanted_cold"),
    [
        (5, 6, 20.0, 4, 2),  # 4 wanted leave room for 2 of the 5 cold ones
        (1, 6, 20.0, 4, 1),
        (3, 4, 20.0, 4, 0),  # no room left
        (3, 2, 20.0, 2, 0),  # wanted clamped to the max: still no room
        (2, 16, 0.0, 0, 2),
    ],
)
def test_cold_workers_are_bounded_by_the_room_left(
    cold: int, max_workers: int, load_rate: float, wanted: int, wanted_cold: int
) -> None:
    d = run(spec(cold_workers=cold, max_workers=max_workers), [rec("a", perf=10)], load_rate=load_rate)
    assert (d.wanted_workers, d.wanted_cold_workers) == (wanted, wanted_cold)


def test_without_a_measured_perf_demand_asks_for_one_worker() -> None:
    unmeasured = [rec("a", perf=0.0, state=WorkerState.LOADING)]
    d = run(spec(), unmeasured, load_rate=1000.0)
    assert d.perf_per_worker is None
    assert d.wanted_workers == 1
    assert (d.starting_workers, d.action) == (1, Action.HOLD)
    assert run(spec(), [], load_rate=1000.0).wanted_workers == 1
    assert run(spec(), [], outstanding=5.0).wanted_workers == 1
    none = run(spec(), [])
    assert (none.demand, none.wanted_workers, none.action) == (0.0, 0, Action.HOLD)


def test_scaling_up_from_cold_workers_uses_their_measured_perf() -> None:
    """With every worker stopped there was no perf, and any demand asked for one worker, one at a time."""
    cold = [rec(f"c{i}", perf=10.0, state=WorkerState.STOPPED) for i in range(5)]
    d = run(spec(max_workers=50), cold, load_rate=200.0)
    assert (d.perf_per_worker, d.wanted_workers, d.action) == (10.0, 40, Action.SCALE_UP)  # 200 / (10 * 0.5)
    silent = [rec("s", perf=4.0, seen_s_ago=HEARTBEAT_S * 10)]  # the last speed known for the endpoint
    assert run(spec(max_workers=50), silent, load_rate=20.0).wanted_workers == 10


def test_demand_that_fits_whole_workers_is_not_rounded_up_past_them() -> None:
    """56.7 / (9 * 0.9) is 7.000000000000001 in floats: eight workers for what seven serve."""
    d = run(spec(target_util=0.9, max_workers=50), [rec("a", perf=9.0)], load_rate=3402 / 60)
    assert d.wanted_workers == 7
    assert run(spec(target_util=0.9, max_workers=50), [rec("a", perf=9.0)], load_rate=57.0).wanted_workers == 8


def test_requests_a_worker_holds_want_it_kept_even_when_they_cost_nothing() -> None:
    """100 routes of cost 0: no load, no load rate, and the decision scaled the serving workers to zero. An open
    request no worker holds (its client stopped polling) wants nothing: it held a worker up for the request ttl."""
    holding = dataclasses.replace(rec("a"), open_requests=100)
    stats = LoadStats(load_rate=0.0, outstanding=0.0, open_requests=100)
    d = decide(spec(), [holding, rec("b")], stats, now=NOW, heartbeat_timeout_s=HEARTBEAT_S)
    assert (d.wanted_workers, d.action) == (1, Action.SCALE_DOWN)
    abandoned = LoadStats(load_rate=0.0, outstanding=0.0, open_requests=1)  # waiting, unpolled for a window
    assert decide(spec(), [], abandoned, now=NOW, heartbeat_timeout_s=HEARTBEAT_S).wanted_workers == 0
    assert run(spec(), [rec("a"), rec("b")]).wanted_workers == 0


def test_perf_counts_live_ready_and_loading_workers_that_measured_one() -> None:
    workers = [
        rec("ready", perf=10),
        rec("loading", perf=30, state=WorkerState.LOADING),
        rec("unmeasured", perf=0.0),
        rec("error", perf=1000, state=WorkerState.ERROR),
        rec("stopped", perf=1000, state=WorkerState.STOPPED),
    ]
    d = run(spec(), workers, load_rate=40.0)
    assert d.perf_per_worker == 20.0  # mean(10, 30)
    assert d.wanted_workers == 4  # 40 / (20 * 0.5)
    assert (d.ready_workers, d.starting_workers) == (1, 1)  # the unmeasured ready one takes no requests


def test_a_ready_worker_without_perf_is_no_capacity() -> None:
    # picking skips it (it divides by max_perf), so demand must still ask for a worker that can serve
    d = run(spec(), [rec("a", perf=0.0)], load_rate=1.0)
    assert (d.perf_per_worker, d.ready_workers, d.wanted_workers) == (None, 0, 1)
    assert d.action is Action.SCALE_UP


def test_the_mean_perf_does_not_overflow() -> None:
    # 1.7e308 + 1.7e308 is inf: a sum-first mean made perf inf and wanted 0 under demand
    d = run(spec(), [rec("a", perf=1.7e308), rec("b", perf=1.7e308)], load_rate=10.0)
    assert d.perf_per_worker == 1.7e308
    assert d.wanted_workers == 1
    assert run(spec(), [rec(f"w{i}", perf=1.0) for i in range(6)]).perf_per_worker == 1.0  # no rounding otherwise


@pytest.mark.parametrize(("load_rate", "perf"), [(1e-320, 1e12), (5e-324, 10.0), (1.0, 1.7e308)])
def test_any_demand_wants_at_least_one_worker(load_rate: float, perf: float) -> None:
    # demand / (perf * target_util) underflows to 0 here: ceil gave 0 workers for a positive demand
    d = run(spec(), [rec("a", perf=perf)], load_rate=load_rate)
    assert d.demand > 0 and d.wanted_workers == 1
    assert run(spec(max_workers=0), [rec("a", perf=perf)], load_rate=load_rate).wanted_workers == 0


@pytest.mark.parametrize("perf", [1e-300, 5e-324])
def test_a_ratio_past_any_float_wants_max_workers(perf: float) -> None:
    # 1e300 / (1e-300 * 0.5) is inf, and ceil(inf) raised OverflowError; 5e-324 * 0.5 is 0.0: ZeroDivisionError
    d = run(spec(max_workers=7), [rec("a", perf=perf)], load_rate=1e300)
    assert d.wanted_workers == 7


def test_stale_workers_are_ignored() -> None:
    workers = [rec("live", perf=10), rec("stale", perf=1000, seen_s_ago=HEARTBEAT_S + 1),
               rec("stale-loading", perf=1000, state=WorkerState.LOADING, seen_s_ago=HEARTBEAT_S + 1)]  # fmt: skip
    d = run(spec(), workers, load_rate=20.0)
    assert d.perf_per_worker == 10.0
    assert (d.ready_workers, d.starting_workers) == (1, 0)
    assert d.wanted_workers == 4


def test_actions() -> None:
    three = [rec("a"), rec("b"), rec("c", state=WorkerState.LOADING)]  # ready + starting = 3, perf 10
    assert run(spec(), three, load_rate=15.0).action is Action.HOLD  # 15 / 5 = 3
    assert run(spec(), three, load_rate=15.5).action is Action.SCALE_UP  # 4
    assert run(spec(), three, load_rate=5.0).action is Action.SCALE_DOWN  # 1
    assert run(spec(), three).action is Action.SCALE_DOWN  # 0
    assert run(spec(min_workers=3), three).action is Action.HOLD


def test_to_json() -> None:
    d = run(spec(cold_workers=1), [rec("a", perf=10)], load_rate=10.0)
    assert d.to_json() == {
        "endpoint": "ep",
        "load_rate": 10.0,
        "outstanding_load": 0.0,
        "waiting_requests": 0,
        "waiting_load": 0.0,
        "demand": 10.0,
        "perf_per_worker": 10.0,
        "ready_workers": 1,
        "starting_workers": 0,
        "wanted_workers": 2,
        "wanted_cold_workers": 1,
        "action": "scale_up",
    }

"""Picking a worker and the no-ready status breakdown: pure functions over worker records."""

from __future__ import annotations

from typing import Any

import pytest

from service.dispatch.records import BUSY, INACTIVE, STATUS_KEYS, WorkerRecord, WorkerState
from service.dispatch.selection import pick_worker, status_breakdown
from tests.fakes import worker_record

NOW = 1_000_000.0
HEARTBEAT_S = 30.0
MAX_QUEUE_S = 10.0


def rec(worker_id: str, **fields: Any) -> WorkerRecord:
    return worker_record(worker_id, now=NOW, **fields)


def pick(workers: list[WorkerRecord], avoid: str | None = None, keep: str | None = None) -> str | None:
    picked = pick_worker(
        workers, now=NOW, heartbeat_timeout_s=HEARTBEAT_S, max_queue_time_s=MAX_QUEUE_S, avoid=avoid, keep=keep
    )
    return picked.worker_id if picked else None


def test_no_workers_no_pick() -> None:
    assert pick([]) is None


def test_least_wait_wins_not_least_load() -> None:
    # waits: a 50/10 = 5 s, b 30/10 = 3 s, c 80/40 = 2 s (the most load, but the fastest)
    workers = [rec("a", load=50), rec("b", load=30), rec("c", load=80, perf=40)]
    assert pick(workers) == "c"
    assert pick(workers[:2]) == "b"


def test_equal_waits_go_to_the_lower_load_then_the_lower_id() -> None:
    # a: 20/10 = 2 s, b: 10/5 = 2 s -> b (less load)
    assert pick([rec("a", load=20, perf=10), rec("b", load=10, perf=5)]) == "b"
    # same wait, same load -> the lower id, whatever the order given
    assert pick([rec("w2", load=10), rec("w10", load=10), rec("w1", load=10)]) == "w1"
    assert pick([rec("b"), rec("a")]) == "a"


def test_stale_workers_are_skipped() -> None:
    assert pick([rec("stale", seen_s_ago=HEARTBEAT_S + 0.5), rec("busy-but-live", load=90)]) == "busy-but-live"
    assert pick([rec("stale", seen_s_ago=HEARTBEAT_S + 0.5)]) is None
    assert pick([rec("just-in-time", seen_s_ago=HEARTBEAT_S)]) == "just-in-time"  # <= timeout is live


@pytest.mark.parametrize("state", [WorkerState.LOADING, WorkerState.ERROR, WorkerState.STOPPED])
def test_workers_not_ready_are_skipped(state: WorkerState) -> None:
    assert pick([rec("idle-but-not-ready", state=state), rec("ready", load=50)]) == "ready"
    assert pick([rec("idle-but-not-ready", state=state)]) is None


def test_workers_without_a_measured_speed_are_skipped() -> None:
    assert pick([rec("unmeasured", perf=0.0), rec("measured", load=50)]) == "measured"
    assert pick([rec("unmeasured", perf=0.0)]) is None
    assert pick([rec("negative", perf=-1.0)]) is None


def test_workers_over_the_queue_time_are_skipped() -> None:
    # 101/10 = 10.1 s > 10 s; 100/10 = 10 s is exactly the budget and still allowed
    assert pick([rec("over", load=101)]) is None
    assert pick([rec("at", load=100)]) == "at"
    assert pick([rec("over", load=101), rec("fast-over", load=1000, perf=50)]) is None  # 20 s


def test_avoid_is_never_taken() -> None:
    """With no other worker the retry is answered "no ready worker": the client's poll after its back-off may take
    it again (given it at once, Vast's SDK looped on a dead worker until its heartbeat timed out)."""
    assert pick([rec("a"), rec("b", load=50)], avoid="a") == "b"  # a would wait less, but the retry avoids it
    assert pick([rec("a")], avoid="a") is None  # no alternative
    assert pick([rec("a"), rec("b", load=101)], avoid="a") is None  # the alternative is over the queue time
    assert pick([rec("a"), rec("b", state=WorkerState.LOADING)], avoid="a") is None
    assert pick([rec("a"), rec("b", seen_s_ago=HEARTBEAT_S + 1)], avoid="a") is None
    assert pick([rec("a"), rec("b", load=30), rec("c", load=20)], avoid="a") == "c"  # the best of the others
    assert pick([rec("a"), rec("b", load=50)], avoid="zzz") == "a"  # an unknown avoid changes nothing


def test_ties_on_load_go_to_the_worker_with_fewer_open_requests() -> None:
    """Cost-0 requests left every worker at load 0: all of them went to the lowest id."""
    assert pick([rec("a", open_requests=3), rec("b", open_requests=1)]) == "b"
    assert pick([rec("a", open_requests=1), rec("b", open_requests=1)]) == "a"
    assert pick([rec("a", load=1, open_requests=0), rec("b", open_requests=5)]) == "b"  # the load comes first


def test_keep_is_taken_while_it_can_take_work_whatever_its_wait() -> None:
    assert pick([rec("a"), rec("b", load=500)], keep="b") == "b"  # over the queue time: its load is already there
    assert pick([rec("a"), rec("b", state=WorkerState.LOADING)], keep="b") == "a"
    assert pick([rec("a", load=5), rec("b", seen_s_ago=HEARTBEAT_S + 1)], keep="b") == "a"
    assert pick([rec("a", load=5), rec("b", perf=0.0)], keep="b") == "a"
    assert pick([rec("a"), rec("b", load=50)], keep="zzz") == "a"  # an unknown keep changes nothing


def breakdown(workers: list[WorkerRecord]) -> dict[str, int]:
    return status_breakdown(workers, now=NOW, heartbeat_timeout_s=HEARTBEAT_S, max_queue_time_s=MAX_QUEUE_S)


def test_breakdown_has_every_category_even_when_empty() -> None:
    assert breakdown([]) == dict.fromkeys(STATUS_KEYS, 0)
    assert set(STATUS_KEYS) == {"ready", "busy", "loading", "error", "stopped", "inactive"}
    assert (BUSY, INACTIVE) == ("busy", "inactive")


def test_breakdown_categories() -> None:
    workers = [
        rec("ready", load=100),  # exactly at the budget: still ready
        rec("busy-queue", load=101),
        rec("busy-unmeasured", perf=0.0),
        rec("loading", state=WorkerState.LOADING, perf=0.0),
        rec("error", state=WorkerState.ERROR),
        rec("stopped-1", state=WorkerState.STOPPED),
        rec("stopped-2", state=WorkerState.STOPPED, load=500),
        rec("silent-ready", seen_s_ago=HEARTBEAT_S + 1),
        rec("silent-loading", state=WorkerState.LOADING, seen_s_ago=HEARTBEAT_S + 1),
        rec("silent-busy", load=1000, seen_s_ago=HEARTBEAT_S + 1),
    ]
    assert breakdown(workers) == {"ready": 1, "busy": 2, "loading": 1, "error": 1, "stopped": 2, "inactive": 3}


def test_breakdown_agrees_with_pick() -> None:
    """A pick exists exactly when the breakdown counts a ready worker."""
    cases = [
        [rec("a", load=101)],
        [rec("a", seen_s_ago=HEARTBEAT_S + 1)],
        [rec("a", state=WorkerState.LOADING)],
        [rec("a", load=101), rec("b", load=3)],
        [rec("a", perf=0.0)],
    ]
    for workers in cases:
        assert (pick(workers) is not None) == (breakdown(workers)["ready"] > 0), workers

"""The DispatchStore contract (``service/dispatch/store.py``), run against MemoryStore and RedisStore alike, plus what
only Redis has: several replicas routing at once, and an unreachable server.

Redis takes ``now`` from its own clock, so time-dependent tests use tiny timeouts and real sleeps."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import math
import random
import re
import string
import time
from collections import defaultdict
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio.connection

from service.config import MAX_REQUEST_TTL_S
from service.dispatch import memory_store as memory_store_module
from service.dispatch import redis_store as redis_store_module
from service.dispatch.memory_store import EXPIRY_SWEEP_LIMIT, MemoryStore
from service.dispatch.records import (
    STATUS_KEYS,
    Assigned,
    NoReadyWorker,
    PickPolicy,
    Released,
    WorkerRecord,
    WorkerReport,
    WorkerState,
    reqnum_origin,
    request_idx_origin,
)
from service.dispatch.redis_store import RedisStore, check_url
from service.dispatch.store import DispatchStore, LoadStats, StoreUnavailable, UnknownRequest, waiting_load
from service.errors import TooManyOpenRequests, TooManyWorkers, UrlTaken
from tests.redis_server import RedisServer, free_port

EP = "ep-a"
OTHER_EP = "ep-b"
REDIS_CLOCK_SLACK_REQNUMS = 1_000_000  # the Redis server's clock may trail ours by up to a second
REPLICA_TEST_TIMEOUT_S = 30.0
MIRROR_MAX_OPEN = 20
POLICY = PickPolicy(max_queue_time_s=30.0, heartbeat_timeout_s=60.0, request_ttl_s=600.0)


@pytest.fixture(params=["memory", "redis"])
def make_store(request: pytest.FixtureRequest) -> Callable[[], DispatchStore]:
    # reqnums_per_s=0: reqnums start at 0, so the tests read plain counts (test_counters_start_at_the_clock checks
    # the default)
    if request.param == "memory":
        return lambda: MemoryStore(reqnums_per_s=0)
    url: str = request.getfixturevalue("redis_url")
    prefix: str = request.getfixturevalue("redis_prefix")
    return lambda: RedisStore(url, prefix=prefix, reqnums_per_s=0)


@pytest.fixture
async def store(make_store: Callable[[], DispatchStore]) -> AsyncIterator[DispatchStore]:
    instance = make_store()
    yield instance
    await instance.close()


@pytest.fixture
async def redis_pair(redis_url: str, redis_prefix: str) -> AsyncIterator[tuple[RedisStore, RedisStore]]:
    """Two replicas' stores: separate connection pools on the same keys. Timeouts far above the service's 1 s: these
    tests check atomicity with hundreds of concurrent calls, whose connections a loaded CI machine may open slowly
    (a 1 s connect timeout tripped once there in a 500-call release)."""
    timeouts = {"connect_timeout_s": REPLICA_TEST_TIMEOUT_S, "socket_timeout_s": REPLICA_TEST_TIMEOUT_S,
                "pool_timeout_s": REPLICA_TEST_TIMEOUT_S}  # fmt: skip
    first = RedisStore(redis_url, prefix=redis_prefix, **timeouts)
    second = RedisStore(redis_url, prefix=redis_prefix, **timeouts)
    yield first, second
    await first.close()
    await second.close()


async def report(
    store: DispatchStore,
    worker_id: str,
    *,
    max_perf: float = 1.0,
    state: WorkerState = WorkerState.READY,
    endpoint: str = EP,
    url: str | None = None,
    heartbeat_timeout_s: float = 60.0,
    reqnum_floor: int | None = None,
) -> WorkerRecord:
    url = url or f"http://{worker_id}.{endpoint}:8000"  # a URL is one worker's
    report = WorkerReport(worker_id=worker_id, url=url, state=state, max_perf=max_perf, reqnum_floor=reqnum_floor)
    return await store.report(endpoint, report, heartbeat_timeout_s)


def capped_store(
    kind: str, request: pytest.FixtureRequest, max_workers: int = 1024, max_open: int = 100_000
) -> DispatchStore:
    """A store of ``kind`` holding at most ``max_workers`` workers and ``max_open`` open requests per endpoint (close
    it when done)."""
    caps = {"max_workers_per_endpoint": max_workers, "max_open_requests": max_open}
    if kind == "memory":
        return MemoryStore(reqnums_per_s=0, **caps)
    url, prefix = request.getfixturevalue("redis_url"), request.getfixturevalue("redis_prefix")
    return RedisStore(url, prefix=prefix, reqnums_per_s=0, **caps)


async def open_requests(store: DispatchStore, endpoint: str = EP) -> int:
    return (await store.load_stats(endpoint, 60.0)).open_requests


async def assign(
    store: DispatchStore, cost: float, idx: int | None = None, policy: PickPolicy = POLICY, endpoint: str = EP
) -> Assigned:
    outcome = await store.route(endpoint, cost, idx, policy)
    assert isinstance(outcome, Assigned), outcome
    return outcome


async def no_ready(
    store: DispatchStore, cost: float, idx: int | None = None, policy: PickPolicy = POLICY, endpoint: str = EP
) -> NoReadyWorker:
    outcome = await store.route(endpoint, cost, idx, policy)
    assert isinstance(outcome, NoReadyWorker), outcome
    return outcome


async def loads(store: DispatchStore, endpoint: str = EP) -> dict[str, float]:
    return {w.worker_id: w.load for w in await store.workers(endpoint)}


def breakdown(**counts: int) -> dict[str, int]:
    return {**dict.fromkeys(STATUS_KEYS, 0), **counts}


# -- picking ----------------------------------------------------------------------------------------------------
async def test_new_request_goes_to_least_waiting_worker(store: DispatchStore) -> None:
    await report(store, "w1", max_perf=1.0)
    await report(store, "w2", max_perf=4.0)
    picked = [(await assign(store, 2.0)).worker_id for _ in range(6)]
    # waits (w1, w2) before each pick: (0, 0) tie -> lower load, then id; (2, 0); (2, .5); (2, 1); (2, 1.5);
    # (2, 2) tie -> lower load (2 < 8)
    assert picked == ["w1", "w2", "w2", "w2", "w2", "w1"]
    assert await loads(store) == {"w1": 4.0, "w2": 8.0}


async def test_reqnum_counts_per_worker_and_request_idx_is_unique(store: DispatchStore) -> None:
    await report(store, "w1")
    await report(store, "w2")
    outcomes = [await assign(store, 1.0) for _ in range(10)]
    by_worker: dict[str, list[int]] = defaultdict(list)
    for outcome in outcomes:
        by_worker[outcome.worker_id].append(outcome.reqnum)
    assert by_worker == {"w1": [1, 2, 3, 4, 5], "w2": [1, 2, 3, 4, 5]}
    idxs = [outcome.request_idx for outcome in outcomes]
    assert len(set(idxs)) == len(idxs) and 0 not in idxs
    assert {w.worker_id: w.reqnum for w in await store.workers(EP)} == {"w1": 5, "w2": 5}


async def test_float_loads_follow_double_arithmetic_and_settle_to_zero(store: DispatchStore) -> None:
    await report(store, "w1")
    first = await assign(store, 0.1)
    second = await assign(store, 0.2)
    assert await loads(store) == {"w1": 0.1 + 0.2}  # 0.30000000000000004, as Python adds
    await store.release(EP, [first.request_idx])
    await store.release(EP, [second.request_idx])
    assert await loads(store) == {"w1": 0.0}  # the 5.5e-17 of dust is cleared


@pytest.mark.parametrize("costs", [(1e8, 0.1), (0.1, 1e8), (1e9, 1e-3, 7.0)])
async def test_an_idle_workers_load_is_exactly_zero(store: DispatchStore, costs: tuple[float, ...]) -> None:
    # 1e8 + 0.1 - 1e8 - 0.1 is -5.96e-9 in doubles: dust far over any fixed threshold, at costs up to max_cost
    await report(store, "w1", max_perf=1e12)
    idxs = [(await assign(store, cost)).request_idx for cost in costs]
    for idx in idxs:
        await store.release(EP, [idx])
    [worker] = await store.workers(EP)
    assert (worker.load, worker.open_requests) == (0.0, 0)
    assert math.copysign(1.0, worker.load) == 1.0
    assert await store.load_stats(EP, 10.0) == LoadStats(load_rate=sum(costs) / 10.0, outstanding=0.0)


async def test_dust_never_makes_a_load_negative(store: DispatchStore) -> None:
    await report(store, "w1", max_perf=1e12)
    big, small, free = [await assign(store, cost) for cost in (1e8, 0.1, 0.0)]
    await store.release(EP, [big.request_idx, small.request_idx])  # the free request is still outstanding
    [worker] = await store.workers(EP)
    assert (worker.load, worker.open_requests) == (0.0, 1)  # -5.96e-9 before: a negative queue
    await store.release(EP, [free.request_idx])
    assert await loads(store) == {"w1": 0.0}


async def test_a_retry_and_an_expiry_also_count_down_open_requests(store: DispatchStore) -> None:
    policy = PickPolicy(max_queue_time_s=1e9, heartbeat_timeout_s=60.0, request_ttl_s=0.2)
    await report(store, "w1")
    await report(store, "w2")
    first = await assign(store, 1e8)  # w1
    moved = await assign(store, 0.1, first.request_idx)  # to w2: w1 holds nothing, however the floats fell
    assert (first.worker_id, moved.worker_id) == ("w1", "w2")
    await assign(store, 1e8, policy=policy)  # w1 again (w2 waits 0.1), expiring soon
    await asyncio.sleep(0.35)
    assert {w.worker_id: (w.load, w.open_requests) for w in await store.workers(EP)} == {
        "w1": (0.0, 0),
        "w2": (0.1, 1),
    }


async def test_workers_over_max_queue_time_are_skipped(store: DispatchStore) -> None:
    policy = PickPolicy(max_queue_time_s=5.0, heartbeat_timeout_s=60.0, request_ttl_s=600.0)
    await report(store, "w1", max_perf=2.0)
    await assign(store, 10.0, policy=policy)  # the wait is judged before the cost lands: 0
    await assign(store, 1.0, policy=policy)  # wait 10 / 2 = 5: exactly the limit still qualifies
    refused = await no_ready(store, 1.0, policy=policy)  # wait 5.5
    assert refused.status == breakdown(busy=1)
    await report(store, "w2", max_perf=0.5)
    assert (await assign(store, 1.0, policy=policy)).worker_id == "w2"


async def test_stale_workers_are_skipped_and_counted_inactive(store: DispatchStore) -> None:
    policy = PickPolicy(max_queue_time_s=30.0, heartbeat_timeout_s=0.3, request_ttl_s=600.0)
    await report(store, "w1")
    await report(store, "w2")
    await asyncio.sleep(0.45)
    await report(store, "w2")
    assert (await assign(store, 1.0, policy=policy)).worker_id == "w2"  # w1 would win the id tie-break
    await asyncio.sleep(0.45)
    refused = await no_ready(store, 1.0, policy=policy)
    assert refused.status == breakdown(inactive=2)


# -- retries ----------------------------------------------------------------------------------------------------
async def test_retry_moves_load_and_avoids_previous_worker(store: DispatchStore) -> None:
    await report(store, "w1", max_perf=100.0)
    await report(store, "w2", max_perf=1.0)
    first = await assign(store, 1.0)
    assert first.worker_id == "w1"
    assert (await assign(store, 5.0)).worker_id == "w2"  # w1 waits 0.01, w2 nothing
    retried = await assign(store, 1.0, first.request_idx)  # w1 (0.01) beats w2 (5) but is the one to avoid
    assert (retried.request_idx, retried.worker_id, retried.reqnum) == (first.request_idx, "w2", 2)
    assert await loads(store) == {"w1": 0.0, "w2": 6.0}
    again = await assign(store, 2.0, first.request_idx)  # a retry may carry a new cost: that is what moves on
    assert (again.worker_id, again.reqnum) == ("w1", 2)
    assert await loads(store) == {"w1": 2.0, "w2": 5.0}


async def test_a_retry_waits_a_poll_for_the_only_worker_it_had_without_double_counting(store: DispatchStore) -> None:
    """Vast's SDK retries a connection error at once: handed the same dead worker again (it stays ready until its
    heartbeat times out), each request looped on /route/ some 500 times a second. The poll that follows a no-ready
    answer comes after the client's back-off, and avoids nothing."""
    await report(store, "w1")
    first = await assign(store, 2.0)
    retried = await no_ready(store, 2.0, first.request_idx)
    assert (retried.request_idx, retried.status) == (first.request_idx, breakdown(ready=1))
    assert await loads(store) == {"w1": 0.0}
    polled = await assign(store, 2.0, first.request_idx)
    assert (polled.request_idx, polled.worker_id, polled.reqnum, polled.retry) == (first.request_idx, "w1", 2, False)
    assert await loads(store) == {"w1": 2.0}


async def test_requests_of_cost_zero_spread_over_the_workers(store: DispatchStore) -> None:
    """Every worker stayed at load 0 and every tie went to the lowest id: one worker took all of them."""
    for worker_id in ("w1", "w2", "w3"):
        await report(store, worker_id)
    picked = [(await assign(store, 0.0)).worker_id for _ in range(6)]
    assert sorted(picked) == ["w1", "w1", "w2", "w2", "w3", "w3"]
    assert {w.worker_id: w.open_requests for w in await store.workers(EP)} == {"w1": 2, "w2": 2, "w3": 2}


async def test_a_retry_does_not_wait_behind_its_own_cost(store: DispatchStore) -> None:
    await report(store, "w1", max_perf=1.0)
    first = await assign(store, 45.0)  # 45 s of work on the only worker, over the 30 s queue budget
    await no_ready(store, 45.0, first.request_idx)  # its own load leaves before the pick
    polled = await assign(store, 45.0, first.request_idx)
    assert (polled.worker_id, polled.reqnum) == ("w1", 2)
    assert await loads(store) == {"w1": 45.0}
    second = await store.route(EP, 1.0, None, POLICY)  # a new request does wait behind it
    assert isinstance(second, NoReadyWorker) and second.status["busy"] == 1


async def test_retry_of_unknown_or_foreign_request_raises(store: DispatchStore) -> None:
    await report(store, "w1")
    await report(store, "v1", endpoint=OTHER_EP)
    mine = await assign(store, 3.0)
    for idx in (mine.request_idx + 1000, 0, -1):
        with pytest.raises(UnknownRequest):
            await store.route(EP, 1.0, idx, POLICY)
    with pytest.raises(UnknownRequest):
        await store.route(OTHER_EP, 1.0, mine.request_idx, POLICY)
    assert await loads(store) == {"w1": 3.0}
    assert await loads(store, OTHER_EP) == {"v1": 0.0}


async def test_an_idempotency_key_sent_again_is_a_retry_of_its_request_while_that_is_held(
    store: DispatchStore,
) -> None:
    """A client whose first answer was lost sends the call again: the same request, never its load twice."""
    await report(store, "w1", max_perf=100.0)
    await report(store, "w2", max_perf=1.0)
    await report(store, "v1", endpoint=OTHER_EP)
    first = await store.route(EP, 1.0, None, POLICY, "key-1")
    assert isinstance(first, Assigned) and (first.worker_id, first.retry) == ("w1", False)
    again = await store.route(EP, 1.0, None, POLICY, "key-1")
    assert isinstance(again, Assigned)  # the same worker (a new reqnum, a new signature), its load held once
    assert (again.request_idx, again.worker_id, again.reqnum, again.retry) == (first.request_idx, "w1", 2, True)
    assert await loads(store) == {"w1": 1.0, "w2": 0.0}
    assert (await store.load_stats(EP, 10.0)).load_rate == 0.1  # counted once as new load
    # another endpoint, or another key: a request of its own
    other = await store.route(OTHER_EP, 1.0, None, POLICY, "key-1")
    assert isinstance(other, Assigned) and (other.request_idx, other.retry) != (first.request_idx, True)
    fresh = await store.route(EP, 1.0, None, POLICY, "key-2")
    assert isinstance(fresh, Assigned) and fresh.request_idx not in (first.request_idx, other.request_idx)
    # beside a request_idx the key is not consulted
    by_idx = await store.route(EP, 1.0, fresh.request_idx, POLICY, "key-1")
    assert isinstance(by_idx, Assigned) and (by_idx.request_idx, by_idx.retry) == (fresh.request_idx, True)
    # once its request is released, the key names a new request
    assert (await store.release(EP, [first.request_idx])).released == 1
    after = await store.route(EP, 1.0, None, POLICY, "key-1")
    assert isinstance(after, Assigned) and after.request_idx != first.request_idx and not after.retry
    repeat = await store.route(EP, 1.0, None, POLICY, "key-1")
    assert isinstance(repeat, Assigned) and (repeat.request_idx, repeat.retry) == (after.request_idx, True)


async def test_a_repeated_call_keeps_its_worker_while_that_can_take_work(store: DispatchStore) -> None:
    """A repeat changes nothing the call did: after a retry by request_idx moved the request, a late copy of the first
    call (delayed on the network past the client's timeout) leaves it where the client is being served. Only a worker
    that can no longer take work is left, as a retry leaves it."""
    await report(store, "w1")
    await report(store, "w2", url="http://w2:8000")
    first = await store.route(EP, 1.0, None, POLICY, "k")
    assert isinstance(first, Assigned) and first.worker_id == "w1"
    moved = await assign(store, 1.0, first.request_idx)  # the client retried by request_idx
    assert moved.worker_id == "w2"
    late = await store.route(EP, 1.0, None, POLICY, "k")
    assert isinstance(late, Assigned)
    assert (late.request_idx, late.worker_id, late.retry) == (first.request_idx, "w2", True)
    assert await loads(store) == {"w1": 0.0, "w2": 1.0}
    await report(store, "w2", url="http://w2:8000", state=WorkerState.LOADING)  # w2 can take no work now
    again = await store.route(EP, 1.0, None, POLICY, "k")
    assert isinstance(again, Assigned) and (again.request_idx, again.worker_id) == (first.request_idx, "w1")
    assert await loads(store) == {"w1": 1.0, "w2": 0.0}


async def test_an_idempotency_key_lives_as_long_as_its_request_retries_by_idx_included(store: DispatchStore) -> None:
    """Redis let the key lapse at the first call's ttl while retries by request_idx kept the request held."""
    await report(store, "w1")
    await report(store, "w2", url="http://w2:8000")
    short = dataclasses.replace(POLICY, request_ttl_s=0.4)
    first = await store.route(EP, 1.0, None, short, "k")
    assert isinstance(first, Assigned)
    await asyncio.sleep(0.25)
    await assign(store, 1.0, first.request_idx, short)  # held 0.4 s more from here
    await asyncio.sleep(0.25)  # past the first call's ttl, within the retry's
    again = await store.route(EP, 1.0, None, short, "k")
    assert isinstance(again, Assigned) and (again.request_idx, again.retry) == (first.request_idx, True)
    assert sorted((await loads(store)).values()) == [0.0, 1.0]


async def test_an_expired_request_not_yet_swept_is_not_named_by_its_key(store: DispatchStore) -> None:
    """A call sweeps at most EXPIRY_SWEEP_LIMIT expired requests: one past its ttl but not yet swept is no longer
    held for its key (the memory store took it as a retry, Redis as new), and its eventual sweep must not unbind
    the key from the request that took it over."""
    await report(store, "w1", max_perf=1e9)
    short = dataclasses.replace(POLICY, request_ttl_s=0.5)
    for n in range(EXPIRY_SWEEP_LIMIT + 6):
        assert isinstance(await store.route(EP, 1.0, None, short, f"k{n}"), Assigned)
    last = f"k{EXPIRY_SWEEP_LIMIT + 5}"
    await asyncio.sleep(0.6)  # all expired; the next call sweeps only the oldest EXPIRY_SWEEP_LIMIT of them
    fresh = await store.route(EP, 1.0, None, POLICY, last)
    assert isinstance(fresh, Assigned) and not fresh.retry
    await store.route(EP, 1.0, None, POLICY)  # this call sweeps the rest, the old request under `last` among them
    again = await store.route(EP, 1.0, None, POLICY, last)
    assert isinstance(again, Assigned) and (again.request_idx, again.retry) == (fresh.request_idx, True)


async def test_an_idempotency_key_is_known_to_every_replica(redis_pair: tuple[RedisStore, RedisStore]) -> None:
    """The repeat of a lost answer may reach another replica behind the load balancer."""
    first, second = redis_pair
    await report(first, "w1")
    await report(first, "w2", url="http://w2:8000")
    sent = await first.route(EP, 3.0, None, POLICY, "lb-key")
    again = await second.route(EP, 3.0, None, POLICY, "lb-key")
    assert isinstance(sent, Assigned) and isinstance(again, Assigned)
    assert (again.request_idx, again.retry, again.worker_id) == (sent.request_idx, True, sent.worker_id)
    assert await loads(first) == {"w1": 3.0, "w2": 0.0}


async def test_an_idempotency_key_names_a_request_waiting_for_a_worker_too(store: DispatchStore) -> None:
    waiting = await store.route(EP, 4.0, None, POLICY, "cold-start")
    assert isinstance(waiting, NoReadyWorker)
    polled = await store.route(EP, 4.0, None, POLICY, "cold-start")
    assert isinstance(polled, NoReadyWorker) and polled.request_idx == waiting.request_idx
    await report(store, "w1")
    placed = await store.route(EP, 4.0, None, POLICY, "cold-start")
    # it waited, never held: its first worker is no retry (the reassigned count)
    assert isinstance(placed, Assigned) and (placed.request_idx, placed.retry) == (waiting.request_idx, False)
    assert await loads(store) == {"w1": 4.0}
    stats = await store.load_stats(EP, 10.0)
    assert (stats.load_rate, stats.waiting_requests) == (0.4, 0)


async def test_an_expired_request_frees_its_idempotency_key(store: DispatchStore) -> None:
    await report(store, "w1")
    short = dataclasses.replace(POLICY, request_ttl_s=0.2)
    first = await store.route(EP, 1.0, None, short, "k")
    assert isinstance(first, Assigned)
    await asyncio.sleep(0.3)
    later = await store.route(EP, 1.0, None, short, "k")
    assert isinstance(later, Assigned) and later.request_idx != first.request_idx and not later.retry
    assert await loads(store) == {"w1": 1.0}  # the expired one gave its load back


async def test_no_ready_worker_breakdown_holds_no_load_until_a_retry_assigns_it(store: DispatchStore) -> None:
    policy = PickPolicy(max_queue_time_s=30.0, heartbeat_timeout_s=0.3, request_ttl_s=600.0)
    await report(store, "ready-busy", max_perf=1.0)
    await assign(store, 100.0, policy=policy)  # now 100 s of queue: busy
    await report(store, "silent")
    await asyncio.sleep(0.45)
    await report(store, "ready-busy")  # a report keeps the load
    await report(store, "no-perf", max_perf=0.0)  # ready but cannot take work: busy
    await report(store, "loading", state=WorkerState.LOADING)
    await report(store, "error", state=WorkerState.ERROR)
    await report(store, "stopped", state=WorkerState.STOPPED)
    refused = await no_ready(store, 4.0, policy=policy)
    assert refused.request_idx > 0
    assert refused.status == breakdown(busy=2, loading=1, error=1, stopped=1, inactive=1)
    before = await loads(store)
    assert before["ready-busy"] == 100.0 and sum(before.values()) == 100.0
    assert (await store.load_stats(EP, 60.0)).outstanding == 100.0

    await report(store, "fresh")
    assigned = await assign(store, 4.0, refused.request_idx, policy=policy)
    assert (assigned.request_idx, assigned.worker_id, assigned.reqnum) == (refused.request_idx, "fresh", 1)
    assert (await loads(store))["fresh"] == 4.0
    await no_ready(store, 4.0, refused.request_idx, policy=policy)  # fresh is avoided, nobody else fits
    moved = await assign(store, 4.0, refused.request_idx, policy=policy)  # the poll after that
    assert moved.worker_id == "fresh"
    after = await loads(store)
    assert after["fresh"] == 4.0 and sum(after.values()) == 104.0


# -- release and expiry -----------------------------------------------------------------------------------------
async def test_release_gives_load_back_once(store: DispatchStore) -> None:
    await report(store, "w1")
    await report(store, "v1", endpoint=OTHER_EP)
    first, second = await assign(store, 2.0), await assign(store, 3.0)
    assert await store.release(OTHER_EP, [first.request_idx]) == Released(released=0, unknown=1)
    assert await store.release(EP, [first.request_idx]) == Released(released=1, unknown=0)
    assert await loads(store) == {"w1": 3.0}
    result = await store.release(EP, [first.request_idx, second.request_idx, 987654, second.request_idx])
    assert result == Released(released=1, unknown=1, not_held=2)  # released ones hold nothing any more
    assert await loads(store) == {"w1": 0.0}
    assert await store.release(EP, []) == Released(released=0, unknown=0)


async def test_a_released_request_is_routed_afresh_when_retried_until_it_expires(store: DispatchStore) -> None:
    """Vast's SDK retries a worker's 429 or 5xx by routing the same request_idx again, and a worker releases what it
    refuses (Vast's pyworker does): the retry gets a worker, its load held once and not counted as new load again."""
    short = PickPolicy(max_queue_time_s=30.0, heartbeat_timeout_s=60.0, request_ttl_s=0.3)
    await report(store, "w1")
    await report(store, "w2")
    first = await assign(store, 3.0, policy=short)
    assert await store.release(EP, [first.request_idx], first.worker_id) == Released(released=1, unknown=0)
    assert await loads(store) == {"w1": 0.0, "w2": 0.0}
    again = await assign(store, 3.0, first.request_idx, policy=short)
    assert (again.request_idx, again.retry, again.worker_id) == (first.request_idx, True, "w2")  # avoids w1 no more
    assert sorted((await loads(store)).values()) == [0.0, 3.0]
    assert await store.load_stats(EP, 10.0) == LoadStats(
        load_rate=0.3, outstanding=3.0, open_requests=1
    )  # new load once
    assert await store.release(EP, [again.request_idx], again.worker_id) == Released(released=1, unknown=0)
    await asyncio.sleep(0.45)  # past its ttl: nothing is kept for it any more
    with pytest.raises(UnknownRequest):
        await store.route(EP, 3.0, first.request_idx, short)
    assert await store.release(EP, [first.request_idx]) == Released(released=0, unknown=1)


async def test_a_released_request_is_kept_for_the_retry_window_only(store: DispatchStore) -> None:
    """What a store keeps stays near the requests in flight, not the request rate times the (long) request ttl."""
    await report(store, "w1")
    kept, dropped = await assign(store, 1.0), await assign(store, 2.0)
    assert await store.release(EP, [kept.request_idx], retry_window_s=60.0) == Released(released=1, unknown=0)
    assert await store.release(EP, [dropped.request_idx], retry_window_s=0.2) == Released(released=1, unknown=0)
    await asyncio.sleep(0.35)
    with pytest.raises(UnknownRequest):
        await store.route(EP, 2.0, dropped.request_idx, POLICY)
    await no_ready(store, 1.0, kept.request_idx)  # w1 released it: the retry avoids it, then the poll takes it
    assert (await assign(store, 1.0, kept.request_idx)).request_idx == kept.request_idx
    assert await loads(store) == {"w1": 1.0}


async def test_release_by_a_worker_leaves_requests_a_retry_moved_to_another(store: DispatchStore) -> None:
    await report(store, "w1", max_perf=100.0)
    await report(store, "w2", max_perf=1.0)
    first = await assign(store, 1.0)
    moved = await assign(store, 1.0, first.request_idx)  # the client gave up on w1 and retried: now w2's
    assert (first.worker_id, moved.worker_id) == ("w1", "w2")
    # w1 finishes the first attempt after all: the load the retry put on w2 stays there
    assert await store.release(EP, [first.request_idx], "w1") == Released(released=0, unknown=0, not_held=1)
    assert await loads(store) == {"w1": 0.0, "w2": 1.0}
    assert await store.release(EP, [first.request_idx], "w2") == Released(released=1, unknown=0, not_held=0)
    assert await loads(store) == {"w1": 0.0, "w2": 0.0}
    assert await store.release(EP, [first.request_idx], "w2") == Released(released=0, unknown=0, not_held=1)


async def test_a_request_waiting_for_a_worker_holds_nothing_to_release(store: DispatchStore) -> None:
    await report(store, "w1", state=WorkerState.LOADING)
    refused = await no_ready(store, 5.0)
    assert await store.release(EP, [refused.request_idx]) == Released(released=0, unknown=0, not_held=1)
    assert await loads(store) == {"w1": 0.0}
    await report(store, "w1")
    assert (await assign(store, 5.0, refused.request_idx)).request_idx == refused.request_idx  # its poll goes on


async def test_request_ttl_gives_load_back(store: DispatchStore) -> None:
    policy = PickPolicy(max_queue_time_s=30.0, heartbeat_timeout_s=60.0, request_ttl_s=0.2)
    await report(store, "w1")
    expiring = await assign(store, 3.0, policy=policy)
    kept = await assign(store, 4.0)  # the default policy's TTL is long
    await asyncio.sleep(0.35)
    assert await loads(store) == {"w1": 4.0}
    with pytest.raises(UnknownRequest):
        await store.route(EP, 3.0, expiring.request_idx, policy)
    assert await store.release(EP, [expiring.request_idx, kept.request_idx]) == Released(released=1, unknown=1)
    assert await loads(store) == {"w1": 0.0}


async def test_expiry_sweep_is_bounded_per_call(store: DispatchStore) -> None:
    policy = PickPolicy(max_queue_time_s=1e9, heartbeat_timeout_s=60.0, request_ttl_s=0.2)
    await report(store, "w1")
    await report(store, "v1", endpoint=OTHER_EP)
    for i in range(70):  # more than one sweep's worth, over two endpoints
        await assign(store, 1.0, policy=policy, endpoint=EP if i % 2 else OTHER_EP)
    await asyncio.sleep(0.35)
    # any call sweeps the oldest 64 expired requests, whatever their endpoint: 32 of each endpoint's 35
    assert await loads(store) == {"w1": 3.0}
    assert await loads(store, OTHER_EP) == {"v1": 0.0}  # the next call sweeps the last 6
    assert await loads(store) == {"w1": 0.0}


async def test_the_refresh_loops_load_stats_sweep_far_more_per_call(store: DispatchStore) -> None:
    """With no traffic only the refresh loop calls the store: at 64 per call, expired requests kept their load for
    about twice their ttl after a busy spell."""
    policy = PickPolicy(max_queue_time_s=1e9, heartbeat_timeout_s=60.0, request_ttl_s=0.2)
    await report(store, "w1")
    for _ in range(300):
        await assign(store, 1.0, policy=policy)
    await asyncio.sleep(0.35)
    assert (await store.load_stats(EP, 10.0)).outstanding == 0.0  # one call: every expired request swept


async def test_a_sweep_of_thousands_of_expired_requests_works_in_redis(
    redis_url: str, redis_prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Past ~8000 expired requests at once, the sweep's ZREM of them all failed (Lua 5.1's unpack limit): every
    load_stats call raised, /endpoints/ answered 503 and the gauges stopped."""
    store = RedisStore(redis_url, prefix=redis_prefix)
    policy = PickPolicy(max_queue_time_s=1e9, heartbeat_timeout_s=60.0, request_ttl_s=0.5)
    try:
        await report(store, "w1")
        await asyncio.gather(*(assign(store, 1.0, policy=policy) for _ in range(9_000)))
        await asyncio.sleep(0.6)
        monkeypatch.setattr(redis_store_module, "BACKGROUND_SWEEP_LIMIT", 10_000)  # every one in one script
        assert (await store.load_stats(EP, 10.0)).outstanding == 0.0
        assert await store._redis.zcard(f"{redis_prefix}expiries") == 0
    finally:
        await store.close()


# -- a worker process restarted under its id (WorkerReport.reqnum_floor) ---------------------------------------
async def held(store: DispatchStore, endpoint: str = EP) -> dict[str, dict[int, int]]:
    """Worker id -> {request_idx: reqnum} of the requests it holds, as the store indexes them for reqnum_floor."""
    if isinstance(store, MemoryStore):
        return {worker: dict(idxs) for (name, worker), idxs in store._held.items() if name == endpoint}
    assert isinstance(store, RedisStore)
    index: dict[str, dict[int, int]] = {}
    for key in await store._redis.keys(f"{store.prefix}held:{endpoint}/*"):
        members = await store._redis.zrange(key, 0, -1, withscores=True)
        index[key.rpartition("/")[2]] = {int(idx): int(reqnum) for idx, reqnum in members}
    return index


async def test_a_restart_report_gives_back_the_load_of_the_requests_that_died_with_the_process(
    store: DispatchStore,
) -> None:
    """A worker that crashed and came back under its id kept the load of the requests lost with it until their ttl
    (600 s), and picking avoided it all that time."""
    await report(store, "w1")
    dead = [await assign(store, 2.0), await assign(store, 3.0)]
    first = await report(store, "w1")  # the new process's first report: its answer's reqnum becomes its floor
    assert (first.load, first.reqnum) == (5.0, 2)  # nothing is known of a restart yet
    assert first.given_back == 0
    after = await report(store, "w1", reqnum_floor=first.reqnum)
    assert (after.load, after.open_requests, after.reqnum, after.given_back) == (0.0, 0, 2, 2)
    assert (await report(store, "w1", reqnum_floor=first.reqnum)).given_back == 0  # the same floor again: nothing
    assert await loads(store) == {"w1": 0.0}
    assert await store.load_stats(EP, 10.0) == LoadStats(load_rate=0.5, outstanding=0.0, open_requests=0)
    # known still (a client retries them), held by no worker: the dead process's late release changes nothing
    idxs = [request.request_idx for request in dead]
    assert await store.release(EP, idxs, "w1") == Released(released=0, unknown=0, not_held=2)


async def test_a_request_assigned_after_the_restart_stays_whatever_floor_comes_again(store: DispatchStore) -> None:
    await report(store, "w1")
    dead = await assign(store, 2.0)
    floor = (await report(store, "w1")).reqnum
    alive = await assign(store, 3.0)
    assert alive.reqnum == floor + 1
    # the dead one goes at the first; the same floor again, or an older one: no change
    for reported, given_back in ((floor, 1), (floor, 0), (floor - 1, 0), (0, 0)):
        record = await report(store, "w1", reqnum_floor=reported)
        assert (record.load, record.open_requests, record.given_back) == (3.0, 1, given_back)
    assert await held(store) == {"w1": {alive.request_idx: alive.reqnum}}
    assert await store.release(EP, [alive.request_idx, dead.request_idx], "w1") == Released(1, 0, not_held=1)
    assert await loads(store) == {"w1": 0.0}


async def test_a_retry_of_a_request_given_back_on_a_restart_is_routed_afresh(store: DispatchStore) -> None:
    """A client whose request died with the worker (a lost connection, or the new process's 503
    issued_before_start) routes its request_idx again: a retry, not an unknown request nor new load."""
    await report(store, "w1", max_perf=100.0)
    await report(store, "w2", max_perf=1.0)
    dead = await assign(store, 2.0)
    assert dead.worker_id == "w1"
    await report(store, "w1", max_perf=100.0, reqnum_floor=dead.reqnum)
    assert await loads(store) == {"w1": 0.0, "w2": 0.0}
    again = await assign(store, 2.0, dead.request_idx)
    assert (again.request_idx, again.retry, again.worker_id) == (dead.request_idx, True, "w2")  # as any retry
    assert await loads(store) == {"w1": 0.0, "w2": 2.0}
    assert await store.load_stats(EP, 10.0) == LoadStats(load_rate=0.2, outstanding=2.0, open_requests=1)
    assert await store.release(EP, [again.request_idx], "w2") == Released(released=1, unknown=0)


async def test_a_retry_of_a_request_the_only_worker_lost_polls_back_to_it(store: DispatchStore) -> None:
    await report(store, "w1")
    dead = await assign(store, 2.0)
    await report(store, "w1", reqnum_floor=dead.reqnum)
    assert await loads(store) == {"w1": 0.0}
    await no_ready(store, 2.0, dead.request_idx)  # the retry avoids its last worker once, as any retry
    again = await assign(store, 2.0, dead.request_idx)
    assert (again.request_idx, again.worker_id) == (dead.request_idx, "w1")
    assert await loads(store) == {"w1": 2.0}


async def test_a_report_without_a_floor_changes_nothing(store: DispatchStore) -> None:
    """Vast's own workers do not send reqnum_floor: their requests' loads stay until released or expired."""
    await report(store, "w1")
    first, second = await assign(store, 2.0), await assign(store, 3.0)
    record = await report(store, "w1", reqnum_floor=None)
    assert (record.load, record.open_requests, record.reqnum) == (5.0, 2, 2)
    assert await held(store) == {"w1": {first.request_idx: 1, second.request_idx: 2}}
    below = await report(store, "w1", reqnum_floor=first.reqnum - 1)  # below every request held: none died
    assert (below.load, below.open_requests) == (5.0, 2)


async def test_a_request_expired_before_the_restart_report_leaves_as_expired(store: DispatchStore) -> None:
    short = PickPolicy(max_queue_time_s=30.0, heartbeat_timeout_s=60.0, request_ttl_s=0.2)
    await report(store, "w1")
    expiring = await assign(store, 2.0, policy=short)
    dead = await assign(store, 3.0)
    await asyncio.sleep(0.35)
    record = await report(store, "w1", reqnum_floor=dead.reqnum)
    assert (record.load, record.open_requests, record.given_back) == (0.0, 0, 1)  # the expired one is not counted
    with pytest.raises(UnknownRequest):
        await store.route(EP, 2.0, expiring.request_idx, short)
    assert (await no_ready(store, 3.0, dead.request_idx)).request_idx == dead.request_idx  # this one is kept


async def test_the_index_of_held_requests_follows_them_and_empties(store: DispatchStore) -> None:
    short = PickPolicy(max_queue_time_s=30.0, heartbeat_timeout_s=60.0, request_ttl_s=0.2)
    await report(store, "w1")
    released, moved = await assign(store, 1.0), await assign(store, 1.0)
    expiring = await assign(store, 1.0, policy=short)
    assert await held(store) == {"w1": {released.request_idx: 1, moved.request_idx: 2, expiring.request_idx: 3}}
    await report(store, "w2")
    again = await assign(store, 1.0, moved.request_idx)  # a retry moves it to w2
    await store.release(EP, [released.request_idx])
    assert await held(store) == {"w1": {expiring.request_idx: 3}, "w2": {again.request_idx: again.reqnum}}
    await asyncio.sleep(0.35)
    await store.release(EP, [again.request_idx])
    assert await loads(store) == {"w1": 0.0, "w2": 0.0}  # the expired one swept
    assert await held(store) == {}


async def test_a_held_member_an_older_script_left_is_dropped_and_its_request_left_alone(
    redis_url: str, redis_prefix: str
) -> None:
    """In a rolling deploy, a replica without the held index moves requests without telling it: a restart report
    must not give back a request another worker holds now."""
    store = RedisStore(redis_url, prefix=redis_prefix, reqnums_per_s=0)
    try:
        await report(store, "w1", max_perf=100.0)
        await report(store, "w2", max_perf=1.0)
        moved = await assign(store, 2.0)
        assert await held(store) == {"w1": {moved.request_idx: moved.reqnum}}
        # an older replica's retry: the request and its load go to w2, the held index is not told
        await store._redis.hset(f"{redis_prefix}req:{moved.request_idx}", "worker", "w2")
        await store._redis.hset(f"{redis_prefix}worker:{EP}/w1", mapping={"load": "0", "open_requests": "0"})
        await store._redis.hset(f"{redis_prefix}worker:{EP}/w2", mapping={"load": "2", "open_requests": "1"})
        await report(store, "w1", max_perf=100.0, reqnum_floor=moved.reqnum)
        assert await held(store) == {}
        assert await loads(store) == {"w1": 0.0, "w2": 2.0}
        assert await store.release(EP, [moved.request_idx], "w2") == Released(released=1, unknown=0)
    finally:
        await store.close()


# -- reports and stats ------------------------------------------------------------------------------------------
async def test_report_keeps_load_and_reqnum(store: DispatchStore) -> None:
    first = await report(store, "w1", max_perf=2.5)
    assert (first.load, first.reqnum, first.state, first.max_perf) == (0.0, 0, WorkerState.READY, 2.5)
    assert abs(first.last_seen - await store.now()) < 1.0
    await assign(store, 1.5)
    await assign(store, 2.0)
    again = await report(store, "w1", max_perf=7.0, state=WorkerState.LOADING, url="http://moved:9000")
    assert (again.load, again.reqnum, again.open_requests) == (3.5, 2, 2)
    assert again.last_seen >= first.last_seen
    [record] = await store.workers(EP)
    assert record == again
    assert await store.workers(OTHER_EP) == []


async def test_load_stats(store: DispatchStore) -> None:
    await report(store, "w1")
    await report(store, "w2")
    first = await assign(store, 2.0)
    await assign(store, 3.0)
    await assign(store, 9.0, first.request_idx)  # a retry is not new load
    await report(store, "v1", endpoint=OTHER_EP)
    await assign(store, 7.0, endpoint=OTHER_EP)
    assert await store.load_stats(EP, 10.0) == LoadStats(load_rate=0.5, outstanding=12.0, open_requests=2)
    assert await store.release(EP, [first.request_idx]) == Released(released=1, unknown=0)
    assert await store.load_stats(EP, 10.0) == LoadStats(load_rate=0.5, outstanding=3.0, open_requests=1)
    assert await store.load_stats("nobody", 10.0) == LoadStats(load_rate=0.0, outstanding=0.0)


async def test_outstanding_load_is_the_exact_sum_whatever_order_the_workers_come_in(store: DispatchStore) -> None:
    """Summed left to right, 1e16 + 1 + 1 is 1e16 (each 1 rounds away) or 1e16 + 2 (the 1s first): the stores list
    workers in different orders (a dict, a Redis set), so both must agree on the exact sum."""
    for worker_id in ("w1", "w2", "w3"):
        await report(store, worker_id)
    await assign(store, 1e16)
    await assign(store, 1.0)
    await assign(store, 1.0)
    assert sorted((await loads(store)).values()) == [1.0, 1.0, 1e16]
    assert (await store.load_stats(EP, 10.0)).outstanding == 1e16 + 2.0


async def test_load_stats_count_requests_waiting_for_a_worker_until_they_leave(store: DispatchStore) -> None:
    """A request answered "no ready worker" is demand no worker's load shows (the autoscaler read none): it waits
    until a retry is assigned, the request is released, or its ttl passes. A poll is not a second request."""
    short = PickPolicy(max_queue_time_s=30.0, heartbeat_timeout_s=60.0, request_ttl_s=0.2)
    first, second = await no_ready(store, 2.0), await no_ready(store, 3.0)
    await no_ready(store, 1.0, policy=short)
    await no_ready(store, 4.0, endpoint=OTHER_EP)
    assert await store.load_stats(EP, 10.0) == LoadStats(0.6, 0.0, waiting_requests=3, waiting=6.0, open_requests=3)
    await asyncio.sleep(0.3)  # the short-lived one expires
    await no_ready(store, 2.0, first.request_idx)  # a poll: still one request
    assert await store.load_stats(EP, 10.0) == LoadStats(0.6, 0.0, waiting_requests=2, waiting=5.0, open_requests=2)
    await report(store, "w1")
    await assign(store, 2.0, first.request_idx)  # the retry finds a worker: its load now shows there
    assert await store.load_stats(EP, 10.0) == LoadStats(0.6, 2.0, waiting_requests=1, waiting=3.0, open_requests=2)
    assert await store.release(EP, [first.request_idx]) == Released(released=1, unknown=0)  # done: it left for good
    assert await store.load_stats(EP, 10.0) == LoadStats(0.6, 0.0, waiting_requests=1, waiting=3.0, open_requests=1)
    await assign(store, 3.0, second.request_idx)
    assert await store.load_stats(EP, 10.0) == LoadStats(0.6, 3.0, waiting_requests=0, waiting=0.0, open_requests=1)
    assert await store.load_stats(OTHER_EP, 10.0) == LoadStats(
        0.4, 0.0, waiting_requests=1, waiting=4.0, open_requests=1
    )


async def test_a_waiting_request_counts_while_its_client_polls_within_the_window(store: DispatchStore) -> None:
    """One whose client stopped polling stops counting after a window: it may have been sent anew (a second count),
    and it held scale-to-zero for the request ttl (600 s)."""
    window = 0.5
    polled, abandoned = await no_ready(store, 2.0), await no_ready(store, 3.0)
    stats = await store.load_stats(EP, window)
    assert (stats.waiting_requests, stats.waiting) == (2, 5.0)
    await asyncio.sleep(window * 0.6)
    await no_ready(store, 2.0, polled.request_idx)
    await asyncio.sleep(window * 0.6)  # abandoned was last polled over a window ago, polled within it
    stats = await store.load_stats(EP, window)
    assert (stats.waiting_requests, stats.waiting) == (1, 2.0)
    await no_ready(store, 3.0, abandoned.request_idx)  # its client is back: it counts again
    stats = await store.load_stats(EP, window)
    assert (stats.waiting_requests, stats.waiting) == (2, 5.0)


async def test_a_retry_whose_worker_went_away_waits_again_and_its_worker_cannot_release_it(
    store: DispatchStore,
) -> None:
    await report(store, "w1")
    held = await assign(store, 4.0)
    await report(store, "w1", state=WorkerState.STOPPED)
    await no_ready(store, 4.0, held.request_idx)  # assigned -> waiting: its load leaves w1, its demand waits
    assert await loads(store) == {"w1": 0.0}
    stats = await store.load_stats(EP, 10.0)
    assert (stats.outstanding, stats.waiting_requests, stats.waiting) == (0.0, 1, 4.0)
    assert await store.release(EP, [held.request_idx], "w1") == Released(released=0, unknown=0, not_held=1)
    stats = await store.load_stats(EP, 10.0)
    assert (stats.waiting_requests, stats.waiting) == (1, 4.0)


async def test_the_waiting_hash_of_older_replicas_is_freed(redis_url: str, redis_prefix: str) -> None:
    """The waiting requests were a hash, waiting:E, read whole by every load_stats; they are a zset under a new name
    now, and what older replicas wrote under the old one goes."""
    store = RedisStore(redis_url, prefix=redis_prefix)
    try:
        await store._redis.hset(f"{redis_prefix}waiting:{EP}", "123", "1.0")
        kept = await no_ready(store, 1.0)
        stats = await store.load_stats(EP, 10.0)
        assert (stats.waiting_requests, stats.waiting) == (1, 1.0)
        assert not await store._redis.exists(f"{redis_prefix}waiting:{EP}")
        members = await store._redis.zrange(f"{redis_prefix}waiting_polls:{EP}", 0, -1)
        assert members == [str(kept.request_idx)]
    finally:
        await store.close()


@pytest.mark.parametrize("kind", ["memory", "redis"])
async def test_past_the_sample_the_waiting_load_is_scaled_from_the_latest_polls(
    kind: str, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> None:
    """load_stats read every waiting request: with 100k of them (a cold-start burst) it held Redis over a second
    per call, and every replica's routes timed out behind it."""
    for module in (memory_store_module, redis_store_module):
        monkeypatch.setattr(module, "WAITING_SAMPLE", 4)
    store = capped_store(kind, request)
    try:
        for cost in (1.0, 1.0, 9.0, 9.0, 2.0, 2.0, 2.0, 2.0):  # the four latest cost 2 each
            await no_ready(store, cost)
        stats = await store.load_stats(EP, 10.0)
        assert (stats.waiting_requests, stats.waiting) == (8, 16.0)  # 8 x the sample's mean, not 28
        for module in (memory_store_module, redis_store_module):
            monkeypatch.setattr(module, "WAITING_SAMPLE", 8)
        stats = await store.load_stats(EP, 10.0)
        assert (stats.waiting_requests, stats.waiting) == (8, 28.0)  # all of them: exact
    finally:
        await store.close()


def test_waiting_load_is_exact_within_the_sample_and_scaled_past_it() -> None:
    assert waiting_load([0.1] * 10, 10) == 1.0  # fsum: exact
    assert waiting_load([1.0, 3.0], 10) == 20.0
    assert waiting_load([], 5) == 0.0


async def test_a_release_leaves_no_idempotency_key_in_redis(redis_url: str, redis_prefix: str) -> None:
    """The key (PX the request ttl, 600 s) outlived its released request: ~200 B each, 120 MB at 1000 routes/s."""
    store = RedisStore(redis_url, prefix=redis_prefix)
    try:
        await report(store, "w1")
        first = await store.route(EP, 1.0, None, POLICY, "key-1")
        assert isinstance(first, Assigned)
        assert await store._redis.keys(f"{redis_prefix}idem:*") == [f"{redis_prefix}idem:{EP}/key-1"]
        assert (await store.release(EP, [first.request_idx])).released == 1
        assert await store._redis.keys(f"{redis_prefix}idem:*") == []
    finally:
        await store.close()


async def test_an_open_request_that_another_script_version_let_go_stops_counting_at_its_expiry(
    redis_url: str, redis_prefix: str
) -> None:
    """In a rolling deploy, replicas without the open-request count release and expire requests that others counted:
    a counter kept each such request for ever, until the endpoint answered 429 to every new request."""
    store = RedisStore(redis_url, prefix=redis_prefix, max_open_requests=2)
    short = PickPolicy(max_queue_time_s=30.0, heartbeat_timeout_s=60.0, request_ttl_s=0.3)
    try:
        first = await no_ready(store, 1.0, policy=short)
        # an older replica's sweep or release: the request's record goes, the open count is not told
        await store._redis.delete(f"{redis_prefix}req:{first.request_idx}")
        await store._redis.zrem(f"{redis_prefix}expiries", first.request_idx)
        await no_ready(store, 1.0)  # a long-lived one
        with pytest.raises(TooManyOpenRequests):
            await store.route(EP, 1.0, None, POLICY)
        await asyncio.sleep(0.4)
        assert await open_requests(store) == 1
        await no_ready(store, 1.0)
    finally:
        await store.close()


async def test_counters_start_at_the_clock_so_a_lost_counter_never_reissues_one(
    redis_url: str, redis_prefix: str
) -> None:
    before = time.time()
    memory = MemoryStore()
    first = await report(memory, "w1")
    assert reqnum_origin(before) <= first.reqnum <= reqnum_origin(time.time())
    issued = await assign(memory, 1.0)
    assert request_idx_origin(before) <= issued.request_idx <= request_idx_origin(time.time())
    restarted = MemoryStore()  # a dispatcher restart: in-memory counters are gone
    await report(restarted, "w1")
    again = await assign(restarted, 1.0)
    assert again.reqnum > issued.reqnum
    assert again.request_idx > issued.request_idx
    redis_store = RedisStore(redis_url, prefix=redis_prefix)
    try:
        assert (await report(redis_store, "w1")).reqnum >= reqnum_origin(before) - REDIS_CLOCK_SLACK_REQNUMS
    finally:
        await redis_store.close()


@pytest.mark.parametrize("kind", ["memory", "redis"])
async def test_an_endpoint_holds_at_most_its_cap_of_workers(kind: str, request: pytest.FixtureRequest) -> None:
    """Every route scans the endpoint's workers, so a worker token minting ids without end slowed every endpoint
    (47k made-up ids took routes from 2 to 30 ms, and with Redis timed other endpoints out)."""
    store = capped_store(kind, request, 2)
    try:
        await report(store, "a")
        await report(store, "b")
        with pytest.raises(TooManyWorkers, match=r"'ep-a' already has 2 workers"):
            await report(store, "c")
        assert (await report(store, "a", max_perf=5.0)).max_perf == 5.0  # a known id still reports
        await report(store, "c", endpoint=OTHER_EP)  # the cap is per endpoint
        assert [w.worker_id for w in await store.workers(EP)] == ["a", "b"]
        await asyncio.sleep(0.5)
        await report(store, "a")
        assert await store.forget_workers(EP, 0.3) == 1  # b: silent and holding nothing
        assert (await report(store, "c")).worker_id == "c"  # room again
    finally:
        await store.close()


@pytest.mark.parametrize("kind", ["memory", "redis"])
async def test_an_endpoint_holds_at_most_its_cap_of_open_requests(kind: str, request: pytest.FixtureRequest) -> None:
    """Each open request is state kept until it is released or expires: a client routing without end (no worker
    ready, or cost 0, or a worker that never reports done) filled memory (~470 bytes each) or Redis for everyone."""
    store = capped_store(kind, request, max_open=3)
    try:
        await report(store, "w1", max_perf=1e6)
        first = await assign(store, 1.0)
        await assign(store, 2.0)
        keyed = await store.route(EP, 4.0, None, POLICY, "key-1")
        assert isinstance(keyed, Assigned) and await open_requests(store) == 3
        with pytest.raises(TooManyOpenRequests, match=r"'ep-a' already has 3 open requests"):
            await store.route(EP, 8.0, None, POLICY, "key-2")
        assert await loads(store) == {"w1": 7.0}  # the refusal changed nothing: no load, no reqnum, no idx
        assert (await report(store, "w1", max_perf=1e6)).reqnum == 3
        await report(store, "w2", max_perf=1e6)  # for the retries, which avoid w1
        # not new: a retry by idx and the same call again by its key still route, and stay one request each
        assert (await assign(store, 1.0, first.request_idx)).retry
        again = await store.route(EP, 4.0, None, POLICY, "key-1")
        assert isinstance(again, Assigned) and again.request_idx == keyed.request_idx
        assert await open_requests(store) == 3
        assert isinstance(await store.route(OTHER_EP, 1.0, None, POLICY), NoReadyWorker)  # per endpoint
        assert await open_requests(store, OTHER_EP) == 1

        assert (await store.release(EP, [first.request_idx])).released == 1
        assert await open_requests(store) == 2  # a released request, kept for a retry, is not open
        later = await assign(store, 1.0)
        with pytest.raises(TooManyOpenRequests):
            await assign(store, 1.0)
        # a retry of the released request routes again even at the cap: it is not new, and it is open again
        assert (await assign(store, 1.0, first.request_idx)).retry
        assert await open_requests(store) == 4
        assert (await store.release(EP, [first.request_idx, later.request_idx])).released == 2
        assert await open_requests(store) == 2
    finally:
        await store.close()


@pytest.mark.parametrize("kind", ["memory", "redis"])
async def test_requests_waiting_for_a_worker_count_until_they_expire(kind: str, request: pytest.FixtureRequest) -> None:
    store = capped_store(kind, request, max_open=2)
    short = PickPolicy(max_queue_time_s=30.0, heartbeat_timeout_s=60.0, request_ttl_s=0.5)
    try:
        waiting = await no_ready(store, 1.0, policy=short)
        await no_ready(store, 1.0, policy=short)
        with pytest.raises(TooManyOpenRequests):
            await store.route(EP, 1.0, None, short)
        assert (await no_ready(store, 1.0, waiting.request_idx, short)).request_idx == waiting.request_idx  # a poll
        await asyncio.sleep(0.7)
        await no_ready(store, 1.0, policy=short)  # the route's own sweep dropped the expired two first
        assert await open_requests(store) == 1
        await asyncio.sleep(0.7)
        assert await open_requests(store) == 0  # load_stats sweeps too
    finally:
        await store.close()


async def test_a_polled_or_retried_request_expires_a_ttl_after_its_last_route(store: DispatchStore) -> None:
    short = PickPolicy(max_queue_time_s=30.0, heartbeat_timeout_s=60.0, request_ttl_s=0.6)
    waiting = await no_ready(store, 1.0, policy=short)
    await asyncio.sleep(0.4)
    await no_ready(store, 1.0, waiting.request_idx, short)  # a poll: the ttl starts again
    await asyncio.sleep(0.4)  # 0.8 s after the first route, 0.4 s after the poll
    await no_ready(store, 1.0, policy=short)  # its sweep leaves the polled request alone
    assert await open_requests(store) == 2
    assert (await no_ready(store, 1.0, waiting.request_idx, short)).request_idx == waiting.request_idx
    await asyncio.sleep(0.8)
    with pytest.raises(UnknownRequest):
        await store.route(EP, 1.0, waiting.request_idx, short)
    assert await open_requests(store) == 0


async def test_polls_do_not_grow_the_memory_stores_expiry_heap() -> None:
    """Each poll pushed an entry that stayed until its own expiry: 500,000 polls of one request held 44 MB, past
    what --max-open-requests bounds."""
    store = MemoryStore(reqnums_per_s=0, max_open_requests=1)
    waiting = await no_ready(store, 1.0)
    for _ in range(1000):
        await no_ready(store, 1.0, waiting.request_idx)
    assert len(store._expiries) == 1


@pytest.mark.parametrize("kind", ["memory", "redis"])
async def test_an_expired_request_behind_the_sweeps_backlog_is_unknown(
    kind: str, request: pytest.FixtureRequest
) -> None:
    """Each call sweeps a bounded number of expired requests; one further back was still retried (with a fresh ttl)
    or released as if it were held."""
    store = capped_store(kind, request)
    short = PickPolicy(max_queue_time_s=30.0, heartbeat_timeout_s=60.0, request_ttl_s=0.5)
    try:
        await report(store, "w1", max_perf=1e9)
        backlog = [await assign(store, 1.0, policy=short) for _ in range(3 * EXPIRY_SWEEP_LIMIT)]
        await asyncio.sleep(0.8)
        assert (await report(store, "w1", max_perf=1e9)).load == len(backlog)  # reports do not sweep
        with pytest.raises(UnknownRequest):
            await store.route(EP, 1.0, backlog[-1].request_idx, short)
        released = await store.release(EP, [backlog[-2].request_idx])
        assert (released.released, released.unknown) == (0, 1)
        # the route's sweep took EXPIRY_SWEEP_LIMIT back, and the two expired ones named left: none routed again
        assert (await report(store, "w1", max_perf=1e9)).load == len(backlog) - EXPIRY_SWEEP_LIMIT - 2
    finally:
        await store.close()


@pytest.mark.parametrize("kind", ["memory", "redis"])
async def test_expired_waiting_requests_leave_the_waiting_table_of_an_endpoint_no_longer_served(
    kind: str, request: pytest.FixtureRequest
) -> None:
    """Only load_stats trimmed it, and the refresh loop calls that for configured endpoints only: a removed
    endpoint's waiting requests stayed in Redis for good."""
    store = capped_store(kind, request)
    short = PickPolicy(max_queue_time_s=30.0, heartbeat_timeout_s=60.0, request_ttl_s=0.3)
    try:
        for _ in range(5):
            await no_ready(store, 1.0, policy=short, endpoint=OTHER_EP)
        await asyncio.sleep(0.5)
        await no_ready(store, 1.0)  # another endpoint's route sweeps the expired requests
        if isinstance(store, RedisStore):
            assert await store._redis.zcard(f"{request.getfixturevalue('redis_prefix')}waiting_polls:{OTHER_EP}") == 0
        else:
            assert isinstance(store, MemoryStore) and not store._waiting[OTHER_EP]
    finally:
        await store.close()


async def test_endpoints_lists_those_holding_worker_records(store: DispatchStore) -> None:
    """The forget sweep goes over these, not the configured endpoints: an endpoint dropped from the endpoints file
    keeps its records until they are forgotten, also by a process started after the drop."""
    assert await store.endpoints() == []
    await report(store, "w1", endpoint=OTHER_EP)
    await report(store, "w1")
    await report(store, "w2")
    assert await store.endpoints() == [EP, OTHER_EP]
    await asyncio.sleep(0.5)
    await report(store, "w2")
    # silent for 0.5 s is past 0.3; w2's report just now stays within it however slow the machine (a 20 ms margin
    # was a race)
    assert await store.forget_workers(OTHER_EP, 0.3) == 1
    assert await store.endpoints() == [EP]
    assert await store.forget_workers(EP, 0.3) == 1  # w1; w2 just reported: EP still holds records
    assert await store.endpoints() == [EP]


async def test_silent_idle_workers_are_forgotten(store: DispatchStore) -> None:
    policy = PickPolicy(max_queue_time_s=30.0, heartbeat_timeout_s=0.1, request_ttl_s=600.0)
    await report(store, "holding")
    await report(store, "silent")
    held = await assign(store, 5.0)  # "holding" wins the id tie-break
    await report(store, "other", endpoint=OTHER_EP)
    await asyncio.sleep(0.5)
    await report(store, "fresh", state=WorkerState.LOADING)
    assert await store.forget_workers(EP, 0.3) == 1  # "holding" still holds a request, "fresh" just reported
    assert [w.worker_id for w in await store.workers(EP)] == ["fresh", "holding"]
    assert [w.worker_id for w in await store.workers(OTHER_EP)] == ["other"]  # another endpoint's stay
    assert (await no_ready(store, 1.0, policy=policy)).status == breakdown(loading=1, inactive=1)

    await store.release(EP, [held.request_idx])
    assert await store.forget_workers(EP, 0.3) == 1
    assert (await no_ready(store, 1.0, policy=policy)).status == breakdown(loading=1)  # not counted inactive
    assert await store.forget_workers(EP, 0.3) == 0
    assert await store.forget_workers(EP, 3600.0) == 0
    back = await report(store, "silent")  # a forgotten worker that reports again starts a new record
    assert (back.load, back.open_requests) == (0.0, 0)
    assert [w.worker_id for w in await store.workers(EP)] == ["fresh", "silent"]


# -- one url, one worker -----------------------------------------------------------------------------------------
URL = "http://10.0.0.5:8000"


async def states(store: DispatchStore, endpoint: str = EP) -> dict[str, WorkerState]:
    return {w.worker_id: w.state for w in await store.workers(endpoint)}


async def test_a_url_reported_under_a_new_id_retires_the_old_record(store: DispatchStore) -> None:
    """A worker restarted under a new id: the old record's reqnums are below the new one's, which the new process
    would refuse, so the old record stops taking work (it keeps its ledger until its requests leave)."""
    await report(store, "old", url=URL)
    held = await assign(store, 5.0)
    await report(store, "new", url=URL)
    assert await states(store) == {"new": WorkerState.READY, "old": WorkerState.STOPPED}
    assert (await assign(store, 1.0)).worker_id == "new"
    assert (await assign(store, 1.0, held.request_idx)).worker_id == "new"  # a retry moves its load too
    assert await loads(store) == {"new": 2.0, "old": 0.0}


@pytest.mark.parametrize("kind", ["memory", "redis"])
async def test_a_record_coming_back_to_a_url_goes_on_above_what_was_issued_there(
    kind: str, request: pytest.FixtureRequest
) -> None:
    """x, y, x again on one URL (a worker restarted under another id and back, two ids swapping machines): the
    process now at the URL takes the answer's reqnum as its floor. Below y's reqnums, it accepted y's unexpired
    assignments again (the work done twice), then refused its own as far below the highest seen."""
    if kind == "memory":
        store: DispatchStore = MemoryStore()  # reqnums from the clock, as served
    else:
        store = RedisStore(request.getfixturevalue("redis_url"), prefix=request.getfixturevalue("redis_prefix"))
    try:
        x = await report(store, "x", url=URL)
        await asyncio.sleep(0.01)  # y's record starts later on the clock than x's
        await report(store, "y", url=URL)
        issued_by_y = [(await assign(store, 1.0)).reqnum for _ in range(3)]
        assert max(issued_by_y) > x.reqnum  # what x would have gone on from
        back = await report(store, "x", url=URL)
        assert back.reqnum > max(issued_by_y)
        assert await states(store) == {"x": WorkerState.READY, "y": WorkerState.STOPPED}
        assert (await assign(store, 1.0)).reqnum == back.reqnum + 1
        assert (await report(store, "x", url=URL)).reqnum == back.reqnum + 1  # heartbeats do not move it
    finally:
        await store.close()


async def test_another_endpoints_active_worker_keeps_its_url(store: DispatchStore) -> None:
    """Any endpoint's worker token can report any URL: while that URL's worker is active, another endpoint cannot
    point its clients (and signed assignments) at it."""
    await report(store, "a", url=URL, state=WorkerState.LOADING)
    with pytest.raises(UrlTaken, match="another endpoint") as refused:
        await report(store, "intruder", url=URL, endpoint=OTHER_EP)
    assert EP not in str(refused.value)  # another tenant's endpoint is not named
    assert await states(store) == {"a": WorkerState.LOADING}
    assert await store.workers(OTHER_EP) == []


@pytest.mark.parametrize("gone", ["stopped", "silent"])
async def test_another_endpoint_takes_a_url_whose_worker_stopped_or_went_silent(
    store: DispatchStore, gone: str
) -> None:
    """A worker moved to another endpoint's pool keeps its URL."""
    await report(store, "a", url=URL, state=WorkerState.STOPPED if gone == "stopped" else WorkerState.READY)
    await asyncio.sleep(0.2)
    await report(store, "b", url=URL, endpoint=OTHER_EP, heartbeat_timeout_s=0.1)
    assert await states(store, OTHER_EP) == {"b": WorkerState.READY}
    assert await states(store) == {"a": WorkerState.STOPPED}
    # and b's url is b's now: a, reporting it again while b is active, is refused
    with pytest.raises(UrlTaken):
        await report(store, "a", url=URL)


async def test_a_worker_that_moves_frees_its_old_url(store: DispatchStore) -> None:
    await report(store, "a", url=URL)
    await report(store, "a", url="http://10.0.0.6:8000")
    await report(store, "b", url=URL, endpoint=OTHER_EP)
    assert await states(store) == {"a": WorkerState.READY}
    assert await states(store, OTHER_EP) == {"b": WorkerState.READY}


async def test_a_forgotten_worker_frees_its_url(store: DispatchStore) -> None:
    await report(store, "a", url=URL)
    await asyncio.sleep(0.05)
    assert await store.forget_workers(EP, 0.02) == 1
    await report(store, "b", url=URL, endpoint=OTHER_EP)
    assert await states(store, OTHER_EP) == {"b": WorkerState.READY}


@pytest.mark.parametrize("kind", ["memory", "redis"])
async def test_a_refused_report_changes_nothing(kind: str, request: pytest.FixtureRequest) -> None:
    """Refusals come before any change: a full endpoint's new id does not retire the URL's old record."""
    store = capped_store(kind, request, 1)
    try:
        await report(store, "a", url=URL)
        with pytest.raises(TooManyWorkers):
            await report(store, "b", url=URL)
        assert await states(store) == {"a": WorkerState.READY}
        assert (await assign(store, 1.0)).worker_id == "a"
    finally:
        await store.close()


async def test_now_and_ping(store: DispatchStore) -> None:
    await store.ping()
    assert abs(await store.now() - time.time()) < 5.0  # Redis runs on this machine, on its clock


# -- Redis only -------------------------------------------------------------------------------------------------
async def test_concurrent_routes_from_two_replicas_are_atomic(redis_pair: tuple[RedisStore, RedisStore]) -> None:
    first, second = redis_pair
    policy = PickPolicy(max_queue_time_s=1e9, heartbeat_timeout_s=60.0, request_ttl_s=600.0)
    origins = {w: (await report(first, w, max_perf=10.0)).reqnum for w in ("w1", "w2", "w3")}
    costs = [float(1 + i % 7) for i in range(500)]  # integers: every sum is exact
    outcomes = await asyncio.gather(
        *((first if i % 2 else second).route(EP, cost, None, policy) for i, cost in enumerate(costs))
    )
    assigned = [outcome for outcome in outcomes if isinstance(outcome, Assigned)]
    assert len(assigned) == len(costs)
    reqnums: dict[str, list[int]] = defaultdict(list)
    for outcome in assigned:
        reqnums[outcome.worker_id].append(outcome.reqnum)
    assert set(reqnums) == {"w1", "w2", "w3"}
    for worker_id, numbers in reqnums.items():
        origin = origins[worker_id]
        assert sorted(numbers) == list(range(origin + 1, origin + len(numbers) + 1))
    idxs = [outcome.request_idx for outcome in assigned]
    assert len(set(idxs)) == len(idxs) and 0 not in idxs
    workers = await second.workers(EP)
    assert sum(w.load for w in workers) == sum(costs)
    assert {w.worker_id: w.reqnum for w in workers} == {k: origins[k] + len(v) for k, v in reqnums.items()}

    results = await asyncio.gather(*((first if i % 2 else second).release(EP, [idx]) for i, idx in enumerate(idxs)))
    assert sum(r.released for r in results) == len(idxs)
    assert await loads(first) == {"w1": 0.0, "w2": 0.0, "w3": 0.0}


async def test_concurrent_retries_from_two_replicas_move_load_without_counting_it_twice(
    redis_pair: tuple[RedisStore, RedisStore],
) -> None:
    """Ten retries of each of 50 requests at once, half through each replica: every retry moves its request's load
    to the worker it picks, so the total stays 50 costs, and every assignment (first or retry) takes the next reqnum
    of its worker."""
    first, second = redis_pair
    policy = PickPolicy(max_queue_time_s=1e9, heartbeat_timeout_s=60.0, request_ttl_s=600.0)
    origins = {w: (await report(first, w, max_perf=10.0)).reqnum for w in ("w1", "w2", "w3", "w4")}
    firsts = [await first.route(EP, 7.0, None, policy) for _ in range(50)]
    assert all(isinstance(outcome, Assigned) for outcome in firsts)
    idxs = [outcome.request_idx for outcome in firsts if isinstance(outcome, Assigned)]
    retries = await asyncio.gather(
        *((first if i % 2 else second).route(EP, 7.0, idx, policy) for i in range(10) for idx in idxs)
    )
    assert all(isinstance(outcome, Assigned) for outcome in retries)
    reqnums: dict[str, list[int]] = defaultdict(list)
    for outcome in [*firsts, *retries]:
        assert isinstance(outcome, Assigned)
        reqnums[outcome.worker_id].append(outcome.reqnum)
    for worker_id, numbers in reqnums.items():
        assert sorted(numbers) == list(range(origins[worker_id] + 1, origins[worker_id] + len(numbers) + 1))
    workers = await second.workers(EP)
    assert sum(w.load for w in workers) == 50 * 7.0
    assert sum(w.open_requests for w in workers) == 50
    results = await asyncio.gather(*((first if i % 2 else second).release(EP, [idx]) for i, idx in enumerate(idxs)))
    assert sum(r.released for r in results) == len(idxs)
    assert await loads(first) == {"w1": 0.0, "w2": 0.0, "w3": 0.0, "w4": 0.0}


async def test_a_route_on_a_redis_over_maxmemory_is_unavailable_and_releases_still_free_memory(
    redis_pair: tuple[RedisStore, RedisStore], redis_prefix: str
) -> None:
    """Redis refuses a script only at its first write that may use memory, and route.lua's first writes (the expiry
    sweep) free memory: over maxmemory, routes went on adding requests while worker reports were refused, so clients
    got 200 "no ready worker" from a full store. A route is now refused up front, a 503; what frees memory runs."""
    store, _ = redis_pair
    client = store._redis
    await report(store, "w1")
    held = await assign(store, 2.0)
    fillers = [f"{redis_prefix}filler:{i}" for i in range(10)]
    try:
        for filler in fillers:
            await client.set(filler, "x" * 100_000)
        used = int((await client.info("memory"))["used_memory"])
        await client.config_set("maxmemory", used - 500_000)  # over it now; noeviction, redis-server's default
        with pytest.raises(redis.exceptions.OutOfMemoryError):
            await client.set(redis_prefix + "one-more", "x")
        with pytest.raises(StoreUnavailable, match=r"route failed: .*maxmemory"):
            await store.route(EP, 1.0, None, POLICY)
        assert await store.release(EP, [held.request_idx], "w1") == Released(released=1, unknown=0)
        assert await loads(store) == {"w1": 0.0}
    finally:
        await client.config_set("maxmemory", 0)
        await client.delete(*fillers)
    assert isinstance(await store.route(EP, 1.0, None, POLICY), Assigned)


async def test_a_redis_that_may_evict_keys_is_named_a_problem(redis_pair: tuple[RedisStore, RedisStore]) -> None:
    """An evicted request took its load with it for good (its worker looked busy until restarted); nothing warned."""
    store, _ = redis_pair
    assert await store.server_problems() == []  # redis-server's defaults: 7.x, noeviction
    await store._redis.config_set("maxmemory-policy", "allkeys-lru")
    try:
        [problem] = await store.server_problems()
        assert problem.startswith("maxmemory-policy is allkeys-lru") and "noeviction" in problem
    finally:
        await store._redis.config_set("maxmemory-policy", "noeviction")
    assert await MemoryStore().server_problems() == []


async def test_unreachable_redis_fails_at_the_first_attempt(monkeypatch: pytest.MonkeyPatch) -> None:
    """One connection attempt per call, no retry with back-off: the route answers 503 at once (and a retried route
    script could reserve its cost twice)."""
    attempts = 0
    connect = redis.asyncio.connection.Connection._connect

    async def counted(self: redis.asyncio.connection.Connection) -> None:
        nonlocal attempts
        attempts += 1
        await connect(self)

    monkeypatch.setattr(redis.asyncio.connection.Connection, "_connect", counted)
    store = RedisStore(f"redis://127.0.0.1:{free_port()}/0", connect_timeout_s=0.5, socket_timeout_s=0.5)
    try:
        with pytest.raises(StoreUnavailable, match="PING failed"):
            await store.ping()
        assert attempts == 1
        with pytest.raises(StoreUnavailable, match="route failed"):
            await store.route(EP, 1.0, None, POLICY)
        assert attempts == 2
    finally:
        await store.close()


async def test_store_recovers_when_redis_comes_back(tmp_path: Path) -> None:
    with RedisServer(tmp_path) as server:
        store = RedisStore(server.url, connect_timeout_s=0.5, socket_timeout_s=0.5)
        try:
            await report(store, "w1")
            before = await assign(store, 1.0)
            server.kill()
            with pytest.raises(StoreUnavailable):
                await store.route(EP, 1.0, None, POLICY)
            server.start()
            await report(store, "w1")  # nothing persisted: the worker registers again
            # the counters were lost, yet reqnums and request_idxs go on growing: they restart at the clock, not
            # at 0, so no idx a client may still retry with is issued again to someone else
            after = await assign(store, 1.0)
            assert after.reqnum > before.reqnum
            assert after.request_idx > before.request_idx
        finally:
            await store.close()


async def test_open_checks_the_server(redis_url: str, redis_prefix: str) -> None:
    store = await RedisStore.open(redis_url, prefix=redis_prefix)
    assert store.prefix == redis_prefix
    await store.close()
    with pytest.raises(StoreUnavailable):
        await RedisStore.open(f"redis://:secret@127.0.0.1:{free_port()}/0", connect_timeout_s=0.5)


async def test_redis_error_message_hides_the_password() -> None:
    store = RedisStore(f"redis://user:hunter2@127.0.0.1:{free_port()}/0", connect_timeout_s=0.5)
    try:
        with pytest.raises(StoreUnavailable) as caught:
            await store.ping()
        assert "hunter2" not in str(caught.value) and "user:***@127.0.0.1" in str(caught.value)
    finally:
        await store.close()


@pytest.mark.parametrize("password", ["Us3r#Pw9/xQ", "pa7Z/sK2", "pQ7?sZ4", "aX1#bY2"])
def test_a_password_with_unencoded_reserved_characters_is_never_shown(password: str) -> None:
    """An unencoded '#', '/' or '?' ends the URL's authority early: the parser saw no password, and start-up printed
    the URL whole, with redis-py's error quoting a piece of it ("cast to integer value as 'Us3r'")."""
    url = f"redis://disp:{password}@127.0.0.1:6393/0"
    with pytest.raises(ValueError) as refused:
        check_url(url)
    message = str(refused.value)
    pieces = [piece for piece in re.split(r"[#/?]", password) if piece]
    assert not any(piece in message for piece in pieces), message
    assert "redis://***@127.0.0.1:6393/0" in message and "percent-encode" in message


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("unix:///tmp/redis.sock?password=hunt3r@SecretTail&db=0", "unix:///tmp/redis.sock?password=***&db=0"),
        ("redis://host:6379/0?password=abc@SecretTail", "redis://host:6379/0?password=***"),
        ("rediss://host:6380/0?ssl_password=k3y@SecretTail", "rediss://host:6380/0?ssl_password=***"),
        ("unix:///s?password=se#SecretTail", "unix:///s?password=***"),
        ("rediss://:p/w@host/0?ssl_password=SecretTail", "rediss://***@host/0?ssl_password=***"),
        ("redis://u:[SecretTail]@h:1/0", "redis://***@h:1/0"),
        ("redis://u:Secret?Tail@h:1/0", "redis://***@h:1/0"),  # '?' cut the authority at 'u:Secret'
        ("redis://u:Secret\tTail@h:1/0", "redis://***@h:1/0"),  # the parser drops tabs
        ("redis://us/er:SecretTail@host", "redis://***@host"),  # '/' in a user name: the rest looked a path
        ("redis://host:6379/0?client_name=ops@team", "redis://host:6379/0?client_name=ops@team"),  # no user
        ("unix:///run/redis@main/redis.sock?db=0", "unix:///run/redis@main/redis.sock?db=0"),  # no authority
        ("redis://u@ser:SecretTail@host:1/0", "redis://u@ser:***@host:1/0"),
        ("redis://u:SecretTail@[::1]:6379/0", "redis://u:***@[::1]:6379/0"),
    ],
)
def test_every_url_shape_hides_its_secrets(url: str, shown: str) -> None:
    """Masking by parse showed the tail of a query password holding an '@' (``/health`` quotes the store's URL), and
    a password holding '[' made the parser raise, quoting it; an '@' in a query value masked the host."""
    assert redis_store_module._redacted(url) == shown
    try:
        check_url(url)
    except ValueError as refused:
        assert not any(secret in str(refused) for secret in ("Secret", "Tail", "hunt3r")), str(refused)


def test_a_url_redis_py_chokes_on_is_a_value_error_not_a_traceback() -> None:
    """``?retry=x`` raised AttributeError out of redis-py's pool, a traceback at start."""
    with pytest.raises(ValueError, match=r"^--redis-url redis://host/0\?retry=x: "):
        check_url("redis://host/0?retry=x")


async def test_a_password_given_as_a_query_parameter_is_hidden_too() -> None:
    """redis-py takes ``?password=``; /health (unauthenticated) showed it in the store's error."""
    url = f"rediss://127.0.0.1:{free_port()}/0?password=hunter2&db=0&ssl_password=swordfish"  # TLS key passphrase
    store = RedisStore(url, connect_timeout_s=0.5)
    try:
        with pytest.raises(StoreUnavailable) as caught:
            await store.ping()
        message = str(caught.value)
        assert "hunter2" not in message and "swordfish" not in message, message
        assert "?password=***&db=0&ssl_password=***" in message
    finally:
        await store.close()


async def test_a_cancellation_that_redis_py_loses_still_cancels_the_caller(monkeypatch: pytest.MonkeyPatch) -> None:
    """On Python 3.11 redis-py's send (an ``asyncio.wait_for``) returns instead of raising when a cancel lands as the
    send finishes (CPython gh-86296): the dispatcher's refresh loop then ran on after its cancel, and the shutdown
    waited for it until Hypercorn's 60 s limit. The client here loses the cancel that way every time."""
    store = RedisStore(f"redis://127.0.0.1:{free_port()}/0")  # never connects: the command is replaced
    entered = asyncio.Event()

    async def time_losing_the_cancel() -> tuple[int, int]:
        entered.set()
        # until cancelled; then as wait_for when its inner task had finished in the same tick: a result, no exception
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.Event().wait()
        return 1, 0

    monkeypatch.setattr(store._redis, "time", time_losing_the_cancel)
    try:
        call = asyncio.ensure_future(store.now())
        await entered.wait()
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call
        assert call.cancelled()
        # a call not cancelled is not touched by the check
        monkeypatch.setattr(store._redis, "time", lambda: asyncio.sleep(0, (2, 500_000)))
        assert await store.now() == 2.5
    finally:
        await store.close()


async def test_redis_mirrors_memory_step_by_step(redis_url: str, redis_prefix: str) -> None:
    """The same random operations on both stores give the same answers and the same ledgers, bit for bit: the Lua
    picking, breakdown and float arithmetic are the Python ones. (No time-outs fire: the clocks differ.)"""
    rng = random.Random(20240611)
    # both counters from 1 (the clocks differ); a cap of open requests that the run reaches now and then
    options = {"reqnums_per_s": 0, "request_idxs_per_s": 0, "max_open_requests": MIRROR_MAX_OPEN}
    memory = MemoryStore(**options)
    redis_store = RedisStore(redis_url, prefix=redis_prefix, **options)
    stores: tuple[DispatchStore, DispatchStore] = (memory, redis_store)
    ids = [f"w{i}" for i in range(6)] + ["W", "w10", "é"]  # "é" and "W": code-point order, not the locale's
    states = [WorkerState.READY] * 5 + [WorkerState.LOADING, WorkerState.ERROR, WorkerState.STOPPED]
    issued: list[int] = []
    seen: set[str] = set()
    try:
        for _ in range(400):
            action = rng.random()
            endpoint = EP if rng.random() < 0.8 else OTHER_EP
            if action < 0.2:
                floor = rng.choice([None, None, rng.randrange(40)])  # a restarted process's, or none
                report_ = WorkerReport(rng.choice(ids), f"http://{rng.randrange(12)}", rng.choice(states),
                                       max_perf=rng.choice([0.0, 0.5, 1.0, 3.7, 1e-3]),
                                       reqnum_floor=floor)  # fmt: skip
                open_before = sum(w.open_requests for w in await memory.workers(endpoint))
                results: list[object] = []
                for store in stores:
                    try:
                        record = await store.report(endpoint, report_)
                        results.append((record.load, record.reqnum))
                    except UrlTaken:
                        results.append("url_taken")
                if sum(w.open_requests for w in await memory.workers(endpoint)) < open_before:
                    seen.add("given back on a restart")
            elif action < 0.85:
                cost = rng.choice([0.1, 0.2, 0.3, 1.0, 2.5, 7.0, 1e-10, 1e8, 0.0])
                idx = rng.choice(issued) if issued and rng.random() < 0.3 else None
                key = rng.choice([None, None, "k1", "k2", "k/3"])
                policy = PickPolicy(rng.choice([0.5, 5.0, 30.0]), 600.0, 600.0)
                results = []
                for store in stores:
                    try:
                        results.append(await store.route(endpoint, cost, idx, policy, key))
                    except UnknownRequest:
                        results.append("unknown")
                    except TooManyOpenRequests:
                        results.append("too_many_open_requests")
                if isinstance(results[0], Assigned | NoReadyWorker) and idx is None:
                    issued.append(results[0].request_idx)
                if isinstance(results[0], Assigned) and results[0].retry and idx is None:
                    seen.add("retried by key")
            else:
                batch = rng.sample(issued, min(len(issued), rng.randrange(1, 4))) if issued else [1]
                holder = rng.choice([None, *ids])
                results = [await store.release(endpoint, batch, holder) for store in stores]
            assert results[0] == results[1]
            seen.add(results[0] if isinstance(results[0], str) else type(results[0]).__name__)
            if isinstance(results[0], Released) and results[0].released:
                seen.add("released")
            if isinstance(results[0], Released) and results[0].not_held:
                seen.add("not_held")
            for name in (EP, OTHER_EP):
                ledgers = [[(w.worker_id, w.state, w.max_perf, w.load, w.reqnum, w.open_requests)
                            for w in await s.workers(name)] for s in stores]  # fmt: skip
                assert ledgers[0] == ledgers[1]
                assert await open_requests(memory, name) == await open_requests(redis_store, name)
                assert await held(memory, name) == await held(redis_store, name)
        assert seen >= {"Assigned", "NoReadyWorker", "unknown", "released", "not_held", "retried by key", "url_taken",
                        "too_many_open_requests", "given back on a restart"}  # fmt: skip
    finally:
        await redis_store.close()


async def test_concurrent_routes_share_pipelines_and_each_gets_its_own_answer(
    redis_url: str, redis_prefix: str
) -> None:
    store = RedisStore(redis_url, prefix=redis_prefix, reqnums_per_s=0)
    pipeliner = store._route
    round_trips = 0
    execute = pipeliner._execute

    async def counting(calls: list[Sequence[str]]) -> list[Any]:
        nonlocal round_trips
        round_trips += 1
        return await execute(calls)

    pipeliner._execute = counting  # type: ignore[method-assign]
    try:
        await report(store, "w1", max_perf=1e9)
        outcomes = await asyncio.gather(*(store.route(EP, 1.0, None, POLICY) for _ in range(50)))
        assert sorted(o.reqnum for o in outcomes if isinstance(o, Assigned)) == list(range(1, 51))
        assert round_trips < 50 / 2  # queued in the same loop iteration: far fewer round trips than routes
        with pytest.raises(UnknownRequest):  # one caller's failure stays that caller's
            await asyncio.gather(store.route(EP, 1.0, 10**9, POLICY), store.route(EP, 1.0, None, POLICY))
    finally:
        await store.close()


async def test_a_very_long_request_ttl_works_with_an_idempotency_key(store: DispatchStore) -> None:
    """The longest ttl the settings accept (a year) holds an idempotency key in both stores. (Past ~1e14 s Redis got
    the key's PX in exponent form and every keyed route failed; the settings now stop far below that.)"""
    policy = PickPolicy(max_queue_time_s=30.0, heartbeat_timeout_s=60.0, request_ttl_s=MAX_REQUEST_TTL_S)
    await report(store, "w1")
    first = await store.route(EP, 1.0, None, policy, "long-lived")
    again = await store.route(EP, 1.0, None, policy, "long-lived")
    assert isinstance(first, Assigned) and isinstance(again, Assigned)
    assert (again.request_idx, again.retry) == (first.request_idx, True)


def test_no_random_password_shows_in_the_redacted_url_or_its_error() -> None:
    """Random printable passwords, reserved characters included, in the user info and in ``?password=``: no three
    characters of one reach what the dispatcher prints. Left out: the two shapes that are other URLs by URL syntax,
    a user-info password with '?' then ``name=...@`` (a query value), a query password with '&' (another argument)."""
    rng = random.Random(7)
    alphabet = string.ascii_letters + string.digits + string.punctuation + " \t"
    shapes = ("redis://user:{}@host:6379/0", "rediss://:{}@[::1]", "unix://user:{}@/tmp/r.sock?db=0",
              "redis://host/0?password={}", "rediss://host:6380/0?db=1&ssl_password={}&socket_timeout=5")  # fmt: skip
    for _ in range(400):
        password = "".join(rng.choice(alphabet) for _ in range(rng.randint(4, 14)))
        for shape in shapes:
            if ("?" in password and "=" in password and "@" in shape) or ("&" in password and "@" not in shape):
                continue
            url = shape.format(password)
            shown = [redis_store_module._redacted(url)]
            try:
                check_url(url)
            except ValueError as refused:
                shown.append(str(refused))
            public = url.replace(password, "\0")  # the URL's own text besides the password
            pieces = [password[i : i + 3] for i in range(len(password) - 2)]
            for text in shown:
                assert not [w for w in pieces if w in text and w not in public], (url, text)

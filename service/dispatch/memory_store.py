"""In-memory dispatcher state for one process. Every method runs without awaiting, so each is atomic on the
event loop; several server processes would each have their own state (the runner refuses that)."""

from __future__ import annotations

import dataclasses
import heapq
import itertools
import math
import time
from collections import defaultdict, deque
from collections.abc import Callable, Sequence
from typing import Final

from service.config import MAX_LOAD_WINDOW_S
from service.dispatch.records import (
    REQNUMS_PER_SECOND,
    REQUEST_IDXS_PER_SECOND,
    Assigned,
    NoReadyWorker,
    PickPolicy,
    Released,
    RouteOutcome,
    WorkerRecord,
    WorkerReport,
    WorkerState,
    reqnum_origin,
    request_idx_origin,
)
from service.dispatch.selection import pick_worker, status_breakdown
from service.dispatch.store import (
    DEFAULT_HEARTBEAT_TIMEOUT_S,
    DEFAULT_MAX_OPEN_REQUESTS,
    DEFAULT_MAX_WORKERS_PER_ENDPOINT,
    DEFAULT_RELEASED_RETRY_S,
    LOAD_RATE_BUCKET_S,
    WAITING_SAMPLE,
    LoadStats,
    UnknownRequest,
    too_many_open_requests,
    too_many_workers,
    url_taken,
    waiting_load,
)

EXPIRY_SWEEP_LIMIT = 64  # expired requests released per route call: bounded work per request
# per load_stats call, which the dispatcher's refresh loop makes for each endpoint every few seconds: with no traffic
# the route calls' sweeps alone left expired requests' loads counted for about twice their ttl. Bounded: one Redis
# script holds every replica's routes while it runs (7500 took 47 ms).
BACKGROUND_SWEEP_LIMIT = 2_000
LOAD_HISTORY_S = MAX_LOAD_WINDOW_S  # how far back the load-rate buckets reach: the longest window read


# A request in flight: (endpoint, cost, worker_id or None, expires_at, the worker that released it or None). A plain
# tuple of atomic values, which the garbage collector stops tracking: hundreds of thousands of open requests would
# otherwise make every full collection a pause of tens of milliseconds (measured: 23 ms per 200k as slotted
# dataclasses, 2 ms as tuples).
_Request = tuple[str, float, str | None, float, str | None]
_ENDPOINT: Final = 0
_COST: Final = 1
_WORKER: Final = 2
_EXPIRES: Final = 3
_RELEASED_BY: Final = 4  # a retry of a released request avoids that worker, as any retry avoids its last


def _by_id(worker: WorkerRecord) -> str:
    return worker.worker_id


def load_after_release(load: float, cost: float, open_requests: int) -> float:
    """A worker's load once a request of ``cost`` leaves it, ``open_requests`` being those it still holds after.
    Float sums of costs up to max_cost apart leave dust of any size (1e8 + 0.1 - 1e8 - 0.1 is -6e-9), so no
    threshold can tell it from a real load: a worker holding nothing is exactly 0, and dust never goes below 0."""
    if open_requests <= 0:
        return 0.0
    rest = load - cost
    return rest if rest > 0 else 0.0


class MemoryStore:
    def __init__(
        self,
        clock: Callable[[], float] = time.time,
        *,
        reqnums_per_s: int = REQNUMS_PER_SECOND,
        request_idxs_per_s: int = REQUEST_IDXS_PER_SECOND,
        max_workers_per_endpoint: int = DEFAULT_MAX_WORKERS_PER_ENDPOINT,
        max_open_requests: int = DEFAULT_MAX_OPEN_REQUESTS,
    ) -> None:
        self._clock = clock
        self._max_workers = max_workers_per_endpoint
        self._max_open = max_open_requests
        self._reqnums_per_s = reqnums_per_s
        self._workers: dict[str, dict[str, WorkerRecord]] = defaultdict(dict)
        self._requests: dict[int, _Request] = {}
        self._open: dict[str, int] = defaultdict(int)  # endpoint -> its requests not released (held or waiting)
        self._expiries: list[tuple[float, int]] = []  # heap of (due, idx), due at or before the request's expiry
        self._next_idx = itertools.count(request_idx_origin(self._clock(), request_idxs_per_s))
        self._load_buckets: dict[str, deque[list[float]]] = defaultdict(deque)
        # endpoint -> {request_idx: when last answered "no ready worker"}, oldest poll first: autoscaling's demand.
        # An entry leaves when its request finds a worker or leaves, or when its poll is older than the window.
        self._waiting: dict[str, dict[int, float]] = defaultdict(dict)
        # (endpoint, Idempotency-Key) -> request_idx, and back: a key names its request while that is held and
        # unexpired (an expired one not yet swept no longer counts), and the entries leave with the request
        self._by_key: dict[tuple[str, str], int] = {}
        self._key_of: dict[int, tuple[str, str]] = {}
        self._url_owner: dict[str, tuple[str, str]] = {}  # url -> (endpoint, worker id) of the record reporting it
        # (endpoint, worker id) -> {request_idx: its reqnum} of the requests that worker holds, which a report's
        # reqnum_floor gives back. Entries go in as assigned, so in reqnum order: a worker's reqnums only grow.
        self._held: dict[tuple[str, str], dict[int, int]] = {}

    async def route(
        self,
        endpoint: str,
        cost: float,
        request_idx: int | None,
        policy: PickPolicy,
        idempotency_key: str | None = None,
    ) -> RouteOutcome:
        now = self._clock()
        self._expire(now)
        workers = self._workers[endpoint]
        repeat = False  # the same call again, by its Idempotency-Key: its worker is kept while it can take work
        if request_idx is None and idempotency_key is not None:
            known = self._by_key.get((endpoint, idempotency_key))
            if known is not None and self._requests[known][_EXPIRES] > now:  # held, unexpired: that request
                request_idx, repeat = known, True
        if request_idx is None and self._open[endpoint] >= self._max_open:
            self._expire(now, len(self._expiries))  # at the cap, expired requests no longer count (as in Redis)
            if self._open[endpoint] >= self._max_open:
                raise too_many_open_requests(endpoint, self._max_open)
        previous: _Request | None = None
        if request_idx is not None:
            previous = self._live(request_idx, now)
            if previous is None or previous[_ENDPOINT] != endpoint:
                raise UnknownRequest(request_idx)
            if previous[_WORKER] is not None:
                # a retry's load leaves its old worker before picking, wherever it goes next
                self._unassign(endpoint, previous[_WORKER], request_idx, previous[_COST])
        picked = pick_worker(
            workers.values(),
            now=now,
            heartbeat_timeout_s=policy.heartbeat_timeout_s,
            max_queue_time_s=policy.max_queue_time_s,
            avoid=(previous[_WORKER] or previous[_RELEASED_BY]) if previous and not repeat else None,
            keep=previous[_WORKER] if previous and repeat else None,
        )
        if previous is None:
            request_idx = next(self._next_idx)
            self._add_load_rate(endpoint, now, cost)
            if idempotency_key is not None:
                self._by_key[endpoint, idempotency_key] = request_idx
                self._key_of[request_idx] = (endpoint, idempotency_key)
        assert request_idx is not None
        if picked is None:
            self._track(request_idx, (endpoint, cost, None, now + policy.request_ttl_s, None))
            waiting = self._waiting[endpoint]
            waiting.pop(request_idx, None)  # to the end: the dict stays in order of polls
            waiting[request_idx] = now
            status = status_breakdown(
                workers.values(),
                now=now,
                heartbeat_timeout_s=policy.heartbeat_timeout_s,
                max_queue_time_s=policy.max_queue_time_s,
            )
            return NoReadyWorker(request_idx=request_idx, status=status)
        if previous is not None:
            self._waiting[endpoint].pop(request_idx, None)
        picked.load += cost
        picked.open_requests += 1
        picked.reqnum += 1
        self._held.setdefault((endpoint, picked.worker_id), {})[request_idx] = picked.reqnum
        self._track(request_idx, (endpoint, cost, picked.worker_id, now + policy.request_ttl_s, None))
        return Assigned(
            request_idx=request_idx,
            worker_id=picked.worker_id,
            url=picked.url,
            reqnum=picked.reqnum,
            # the request had a worker (or was released by one): a poll that found one is no retry
            retry=previous is not None and (previous[_WORKER] is not None or previous[_RELEASED_BY] is not None),
        )

    async def report(
        self, endpoint: str, report: WorkerReport, heartbeat_timeout_s: float = DEFAULT_HEARTBEAT_TIMEOUT_S
    ) -> WorkerRecord:
        now = self._clock()
        me = (endpoint, report.worker_id)
        holder = self._url_holder(report.url, other_than=me)
        if holder is not None and holder[0] != endpoint and holder[1].holds_url(now, heartbeat_timeout_s):
            raise url_taken(report.url, heartbeat_timeout_s)
        workers = self._workers[endpoint]
        old = workers.get(report.worker_id)
        if old is None and len(workers) >= self._max_workers:
            raise too_many_workers(endpoint, self._max_workers)
        if holder is not None:  # refusals above change nothing: only now is the URL taken over
            holder[1].state = WorkerState.STOPPED
        given_back = 0
        if old is not None and report.reqnum_floor is not None:
            given_back = self._give_back_issued_up_to(endpoint, report.worker_id, report.reqnum_floor, now)
        if old is not None and old.url != report.url and self._url_owner.get(old.url) == me:
            del self._url_owner[old.url]
        origin = reqnum_origin(now, self._reqnums_per_s)
        reqnum = origin if old is None else old.reqnum
        if self._url_owner.get(report.url) != me:  # binding a URL: from the clock on (records.reqnum_origin)
            reqnum = max(reqnum, origin)
        self._url_owner[report.url] = me
        record = WorkerRecord.from_report(
            report,
            last_seen=now,
            load=old.load if old else 0.0,
            reqnum=reqnum,
            open_requests=old.open_requests if old else 0,
        )
        workers[report.worker_id] = record
        return dataclasses.replace(record, given_back=given_back)

    async def release(
        self,
        endpoint: str,
        request_idxs: Sequence[int],
        worker_id: str | None = None,
        retry_window_s: float = DEFAULT_RELEASED_RETRY_S,
    ) -> Released:
        released = unknown = not_held = 0
        now = self._clock()
        until = now + retry_window_s
        for idx in request_idxs:
            request = self._live(idx, now)
            if request is None or request[_ENDPOINT] != endpoint:
                unknown += 1
                continue
            holder = request[_WORKER]
            if holder is None or (worker_id is not None and holder != worker_id):  # waiting, released, or moved
                not_held += 1
                continue
            self._release(idx, request, holder, until)
            released += 1
        return Released(released=released, unknown=unknown, not_held=not_held)

    async def forget_workers(self, endpoint: str, forget_s: float) -> int:
        now = self._clock()
        self._expire(now)
        workers = self._workers.get(endpoint, {})
        gone = [worker_id for worker_id, worker in workers.items() if worker.forgettable(now, forget_s)]
        for worker_id in gone:
            url = workers.pop(worker_id).url
            self._held.pop((endpoint, worker_id), None)  # empty: it holds no request
            if self._url_owner.get(url) == (endpoint, worker_id):
                del self._url_owner[url]
        return len(gone)

    async def endpoints(self) -> list[str]:
        return sorted(endpoint for endpoint, workers in self._workers.items() if workers)

    async def workers(self, endpoint: str) -> list[WorkerRecord]:
        self._expire(self._clock())
        return sorted((dataclasses.replace(w) for w in self._workers.get(endpoint, {}).values()), key=_by_id)

    async def load_stats(self, endpoint: str, window_s: float) -> LoadStats:
        now = self._clock()
        self._expire(now, BACKGROUND_SWEEP_LIMIT)
        current = math.floor(now / LOAD_RATE_BUCKET_S) * LOAD_RATE_BUCKET_S
        self._trim_load_rate(endpoint, current)
        # the current bucket and those starting after current - window: window_s seconds of buckets
        since = current - window_s + LOAD_RATE_BUCKET_S
        recent = sum(total for start, total in self._load_buckets.get(endpoint, ()) if start >= since)
        outstanding = math.fsum(w.load for w in self._workers.get(endpoint, {}).values())
        waiting = self._waiting_polled_since(endpoint, now - window_s)
        sample = [self._requests[idx][_COST] for idx in itertools.islice(reversed(waiting), WAITING_SAMPLE)]
        return LoadStats(
            load_rate=recent / window_s,
            outstanding=outstanding,
            waiting_requests=len(waiting),
            waiting=waiting_load(sample, len(waiting)),
            open_requests=self._open.get(endpoint, 0),
        )

    async def now(self) -> float:
        return self._clock()

    async def ping(self) -> None:
        return None

    async def server_problems(self) -> list[str]:
        return []

    async def close(self) -> None:
        return None

    # -- internals ------------------------------------------------------------------------------------------
    def _url_holder(self, url: str, *, other_than: tuple[str, str]) -> tuple[str, WorkerRecord] | None:
        """The endpoint and record of the worker reporting ``url``, when that is not ``other_than``."""
        owner = self._url_owner.get(url)
        if owner is None or owner == other_than:
            return None
        record = self._workers.get(owner[0], {}).get(owner[1])
        return (owner[0], record) if record is not None and record.url == url else None

    def _unassign(self, endpoint: str, worker_id: str, request_idx: int, cost: float) -> None:
        """A request of ``cost`` leaves the worker it was assigned to (if the worker is still known)."""
        held = self._held.get((endpoint, worker_id))
        if held is not None:
            held.pop(request_idx, None)
            if not held:
                del self._held[endpoint, worker_id]
        worker = self._workers[endpoint].get(worker_id)
        if worker is not None:
            worker.open_requests = max(0, worker.open_requests - 1)
            worker.load = load_after_release(worker.load, cost, worker.open_requests)

    def _give_back_issued_up_to(self, endpoint: str, worker_id: str, reqnum_floor: int, now: float) -> int:
        """The worker's process refuses every reqnum up to ``reqnum_floor`` (``WorkerReport.reqnum_floor``): the
        requests it holds with one died with the process before, and are released. Each stays known, without a
        worker, until its own expiry, as it would have stayed held: a client that retries it (after the 503
        ``issued_before_start``, or a lost connection) is routed afresh, avoiding this worker once, as any retry. No
        clocks are compared, so no skew matters: a reqnum above the floor, assigned after the restart, stays."""
        held = self._held.get((endpoint, worker_id), {})
        dying = list(itertools.takewhile(lambda idx: held[idx] <= reqnum_floor, held))
        given_back = 0
        for idx in dying:
            request = self._live(idx, now)  # an expired one leaves as such (as in Redis)
            if request is not None and request[_WORKER] == worker_id and request[_ENDPOINT] == endpoint:
                self._release(idx, request, worker_id, request[_EXPIRES])
                given_back += 1
        return given_back

    def _waiting_polled_since(self, endpoint: str, since: float) -> dict[int, float]:
        """The endpoint's requests waiting for a worker, oldest poll first, once those last polled at or before
        ``since`` have left: their client gave up, or sent the request anew, which would count it twice. Each entry
        leaves once, so this costs what was polled since the last call."""
        waiting = self._waiting.get(endpoint, {})
        while waiting:
            idx = next(iter(waiting))
            if waiting[idx] > since:
                break
            del waiting[idx]
        return waiting

    def _add_load_rate(self, endpoint: str, now: float, cost: float) -> None:
        buckets = self._load_buckets[endpoint]
        start = math.floor(now / LOAD_RATE_BUCKET_S) * LOAD_RATE_BUCKET_S
        if buckets and buckets[-1][0] == start:
            buckets[-1][1] += cost
        else:
            buckets.append([start, cost])
        self._trim_load_rate(endpoint, start)

    def _trim_load_rate(self, endpoint: str, current: float) -> None:
        buckets = self._load_buckets.get(endpoint)
        while buckets and buckets[0][0] < current - LOAD_HISTORY_S:
            buckets.popleft()

    def _release(self, request_idx: int, request: _Request, holder: str, until: float) -> None:
        """A worker is done with a request: its load goes back and its Idempotency-Key is unbound, but the request_idx
        stays known, with no worker, until ``until`` (or its own expiry, if sooner). Vast's SDK retries a worker's
        429 or 5xx by routing that idx again, and a worker releases what it refuses (Vast's pyworker does): the
        retry is then routed afresh, its load counted once, instead of failing as an unknown request. The window is
        short so that what is kept stays near the requests in flight, not the request rate times the ttl."""
        self._unbind_key(request_idx)
        self._waiting.get(request[_ENDPOINT], {}).pop(request_idx, None)
        self._unassign(request[_ENDPOINT], holder, request_idx, request[_COST])
        if until < request[_EXPIRES]:
            self._track(request_idx, (request[_ENDPOINT], request[_COST], None, until, holder))
        else:
            self._put(request_idx, (request[_ENDPOINT], request[_COST], None, request[_EXPIRES], holder))

    def _unbind_key(self, request_idx: int) -> None:
        key = self._key_of.pop(request_idx, None)
        if key is not None and self._by_key.get(key) == request_idx:  # the key may name a newer request by now
            del self._by_key[key]

    def _live(self, request_idx: int, now: float) -> _Request | None:
        """The request, unless it has expired: one past its expiry that the bounded sweeps have not reached yet
        leaves now, so that a retry or a release of it finds it unknown, whatever the backlog (as in Redis)."""
        request = self._requests.get(request_idx)
        if request is not None and request[_EXPIRES] <= now:
            self._drop(request_idx, request)
            return None
        return request

    def _drop(self, request_idx: int, request: _Request) -> None:
        """A request leaves for good (expired): its load goes back, its Idempotency-Key is unbound."""
        del self._requests[request_idx]
        self._count_open(request, -1)
        self._waiting.get(request[_ENDPOINT], {}).pop(request_idx, None)
        if request[_WORKER] is not None:
            self._unassign(request[_ENDPOINT], request[_WORKER], request_idx, request[_COST])
        self._unbind_key(request_idx)

    def _track(self, request_idx: int, request: _Request) -> None:
        """Writes a request with a new expiry. The heap gets an entry only when the expiry comes sooner than the
        request's last one (new, or released): a later one (a retry, a poll) is found when the entry it had comes
        due (``_expire`` moves it on). A push per poll grew the heap by the poll rate times the ttl, past the
        open-request cap (500,000 polls of one request: 44 MB)."""
        previous = self._requests.get(request_idx)
        self._put(request_idx, request)
        if previous is None or request[_EXPIRES] < previous[_EXPIRES]:
            heapq.heappush(self._expiries, (request[_EXPIRES], request_idx))

    def _put(self, request_idx: int, request: _Request) -> None:
        """Every write of a request goes here, which keeps the endpoints' open counts (what the cap reads) exact."""
        self._count_open(self._requests.get(request_idx), -1)
        self._requests[request_idx] = request
        self._count_open(request, 1)

    def _count_open(self, request: _Request | None, delta: int) -> None:
        if request is not None and request[_RELEASED_BY] is None:  # released ones are kept for a retry only
            self._open[request[_ENDPOINT]] += delta

    def _expire(self, now: float, limit: int = EXPIRY_SWEEP_LIMIT) -> None:
        swept = 0
        while self._expiries and self._expiries[0][0] <= now and swept < limit:
            _, idx = heapq.heappop(self._expiries)
            request = self._requests.get(idx)
            if request is None:
                continue  # gone already (an earlier entry of it)
            if request[_EXPIRES] > now:  # re-routed since with a later expiry: its entry moves there
                heapq.heappush(self._expiries, (request[_EXPIRES], idx))
                continue
            self._drop(idx, request)
            swept += 1

"""The dispatcher's data: worker reports and records, route outcomes, the picking policy."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from enum import StrEnum


class WorkerState(StrEnum):
    """What a worker reports about itself."""

    LOADING = "loading"
    READY = "ready"
    ERROR = "error"
    STOPPED = "stopped"


# Breakdown categories in a no-ready answer: the reported states, plus two the dispatcher derives.
BUSY = "busy"  # ready, but every request would wait longer than the endpoint's max_queue_time_s
INACTIVE = "inactive"  # has not reported within heartbeat_timeout_s
# A new worker record's reqnums start at unix time x this, so they keep growing even after a restart lost the
# counter (in-memory state, or a Redis without persistence): workers refuse reqnums far below the highest they saw.
# Holds for up to this many requests per second per worker; 2**53 is reached in the year 2255.
REQNUMS_PER_SECOND = 1_000_000


# A record that binds a URL it did not hold (a new one, one taking a URL over, one coming back to a URL another
# record held meanwhile) continues from the clock too, if its own count is lower: the worker now serving that URL
# takes the answer's reqnum as its floor, and a lower one would let it accept again what another record assigned
# there (a replay), then refuse its own new assignments as far below that.
def reqnum_origin(now: float, reqnums_per_s: int = REQNUMS_PER_SECOND) -> int:
    return math.floor(now * reqnums_per_s)


# The request_idx counter starts at the clock the same way, so that a restart that lost it (in-memory state,
# a Redis without persistence) never issues an idx again that a client may still retry with.
REQUEST_IDXS_PER_SECOND = 1_000_000


def request_idx_origin(now: float, request_idxs_per_s: int = REQUEST_IDXS_PER_SECOND) -> int:
    return max(1, math.floor(now * request_idxs_per_s))  # 0 means "a new request" to Vast's clients


STATUS_KEYS = (WorkerState.READY.value, BUSY, WorkerState.LOADING.value, WorkerState.ERROR.value,
               WorkerState.STOPPED.value, INACTIVE)  # fmt: skip


@dataclass(frozen=True, slots=True)
class WorkerReport:
    """``POST /worker_status/``: a worker's view of itself."""

    worker_id: str
    url: str
    state: WorkerState
    max_perf: float  # workload units per second, from the worker's own benchmark
    cur_load: float = 0.0  # the worker's own count of outstanding workload
    in_flight: int = 0
    # The worker process refuses every assignment whose reqnum is at or below this (verifier ``issued_before_start``:
    # the reqnum its first report after starting was answered), or None when the worker does not say (Vast's own
    # workers). The requests this worker holds with such a reqnum died with a previous process: ``report`` releases
    # them, rather than leaving their load on the worker until the request ttl.
    reqnum_floor: int | None = None


@dataclass(slots=True)
class WorkerRecord:
    """A worker as the store holds it: its last report plus the dispatcher's own ledger. Mutable so the
    in-memory store updates load and reqnum in place; stores hand out copies."""

    worker_id: str
    url: str
    state: WorkerState
    max_perf: float
    cur_load: float
    in_flight: int
    last_seen: float  # unix seconds of the last report
    load: float  # sum of the costs of requests assigned here and not yet released
    reqnum: int  # the last reqnum issued for this worker
    # how many requests assigned here are not yet released: when it reaches 0 the load is set to exactly 0, which a
    # float sum of added and removed costs (up to max_cost apart) cannot promise
    open_requests: int = 0
    # on the record ``report`` returns: how many held requests its ``reqnum_floor`` gave back (0 on any other read)
    given_back: int = 0

    @classmethod
    def from_report(
        cls,
        report: WorkerReport,
        *,
        last_seen: float,
        load: float,
        reqnum: int,
        open_requests: int = 0,
        given_back: int = 0,
    ) -> WorkerRecord:
        """The record after ``report``: what the worker said of itself plus the store's ledger."""
        return cls(
            worker_id=report.worker_id,
            url=report.url,
            state=report.state,
            max_perf=report.max_perf,
            cur_load=report.cur_load,
            in_flight=report.in_flight,
            last_seen=last_seen,
            load=load,
            reqnum=reqnum,
            open_requests=open_requests,
            given_back=given_back,
        )

    def active(self, now: float, heartbeat_timeout_s: float) -> bool:
        return now - self.last_seen <= heartbeat_timeout_s

    def holds_url(self, now: float, heartbeat_timeout_s: float) -> bool:
        """Whether its URL is still its own against another endpoint's worker reporting it."""
        return self.state is not WorkerState.STOPPED and self.active(now, heartbeat_timeout_s)

    def forgettable(self, now: float, forget_s: float) -> bool:
        """Silent for longer than ``forget_s`` with nothing outstanding: its record can go (a later report makes a
        new one, whose reqnums start at the clock again)."""
        return now - self.last_seen > forget_s and self.open_requests == 0

    def wait_s(self) -> float:
        """How long a new request would queue here: outstanding work over measured speed."""
        return self.load / self.max_perf


@dataclass(frozen=True, slots=True)
class PickPolicy:
    max_queue_time_s: float
    heartbeat_timeout_s: float
    request_ttl_s: float  # a request not released by then gives its load back


@dataclass(frozen=True, slots=True)
class Assigned:
    request_idx: int
    worker_id: str
    url: str
    reqnum: int
    retry: bool = False  # a request already held, re-routed (by its request_idx or its Idempotency-Key)


@dataclass(frozen=True, slots=True)
class NoReadyWorker:
    request_idx: int
    status: dict[str, int] = field(default_factory=dict)


RouteOutcome = Assigned | NoReadyWorker


@dataclass(frozen=True, slots=True)
class Released:
    released: int  # requests whose load was given back
    unknown: int  # already released, expired, or never issued for this endpoint
    not_held: int = 0  # held by another worker than the one releasing (a retry moved them): left with it

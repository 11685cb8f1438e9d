"""The dispatcher's state behind one interface: in memory (one process) or Redis (several replicas).

Contract, which ``tests/unit/test_dispatch_store.py`` checks against both implementations:

* ``route`` is atomic: picking a worker, reserving the request's cost on it, issuing the worker's next
  ``reqnum`` and (for a new request) a new ``request_idx`` happen as one step.
* A retry (``request_idx`` given) moves the request's load to the newly picked worker; its load is never counted
  twice. A request answered "no ready worker" holds no load until a later retry assigns it.
* ``release`` gives a finished request's load back, once (``not_held`` for a request no worker holds: released
  already, or waiting). A released request stays known, without a worker, for ``retry_window_s`` more (never past
  its ttl): a retry of it (a worker refused it and the client tries again) is routed afresh, avoiding that worker,
  and is not new load again.
* A request never released gives its load back after ``PickPolicy.request_ttl_s``.
* A report with a ``reqnum_floor`` (a worker process that refuses every reqnum up to it: it restarted) gives back,
  as a release by that worker would, the requests it holds with a reqnum at or below the floor, keeping each known
  until its own expiry (not the retry window: a client may retry it as long as it could before); those assigned
  later stay. A report without one leaves the ledger as it is.
* A worker holding no request has a load of exactly 0.0, and a load is never negative.
* ``forget_workers`` removes the records of workers silent for longer than ``forget_s`` that hold no request.
* ``reqnum`` only grows per worker; ``request_idx`` is unique and never 0.
* An endpoint holds at most ``max_open_requests`` open requests (assigned and not released, or waiting for a worker;
  not the released ones kept for a retry, nor expired ones): a new request beyond raises ``TooManyOpenRequests`` and
  changes nothing.
  Retries and repeated calls are not new and still route.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from service.config import DispatcherSettings
from service.dispatch.records import PickPolicy, Released, RouteOutcome, WorkerRecord, WorkerReport
from service.errors import StoreUnavailable, TooManyOpenRequests, TooManyWorkers, UrlTaken

# A store that cannot be reached raises the service's own 503 error, and one whose endpoint is full of workers the
# 409, both passed through unchanged by the handlers.
__all__ = [
    "DEFAULT_HEARTBEAT_TIMEOUT_S",
    "DEFAULT_MAX_OPEN_REQUESTS",
    "DEFAULT_MAX_WORKERS_PER_ENDPOINT",
    "DEFAULT_RELEASED_RETRY_S",
    "LOAD_RATE_BUCKET_S",
    "WAITING_SAMPLE",
    "DispatchStore",
    "LoadStats",
    "StoreUnavailable",
    "UnknownRequest",
    "too_many_open_requests",
    "too_many_workers",
    "url_taken",
    "waiting_load",
]

LOAD_RATE_BUCKET_S = 1  # granularity of the recent-load counters autoscaling reads
# The waiting load is summed over at most this many requests, the most recently polled, and scaled to their count:
# a cold-start burst can hold 100k waiting requests, and summing them all took Redis over a second per call.
WAITING_SAMPLE = 1000
DEFAULT_MAX_WORKERS_PER_ENDPOINT: int = DispatcherSettings.max_workers_per_endpoint
DEFAULT_HEARTBEAT_TIMEOUT_S: float = DispatcherSettings.heartbeat_timeout_s
DEFAULT_MAX_OPEN_REQUESTS: int = DispatcherSettings.max_open_requests
DEFAULT_RELEASED_RETRY_S: float = DispatcherSettings.released_retry_s


def waiting_load(sample: Sequence[float], count: int) -> float:
    """The load of ``count`` waiting requests from the costs of a sample of them (all of them up to
    ``WAITING_SAMPLE``: then exact, whatever the order)."""
    total = math.fsum(sample)
    if not sample or count <= len(sample):
        return total
    return total / len(sample) * count


def too_many_workers(endpoint: str, limit: int) -> TooManyWorkers:
    """What ``report`` raises for a new worker id on an endpoint that already holds ``limit`` records."""
    return TooManyWorkers(
        f"endpoint {endpoint!r} already has {limit} workers registered (--max-workers-per-endpoint); a worker that "
        "stops reporting is forgotten after --worker-forget-s"
    )


def too_many_open_requests(endpoint: str, limit: int) -> TooManyOpenRequests:
    """What ``route`` raises for a new request on an endpoint that already holds ``limit`` open requests."""
    return TooManyOpenRequests(
        f"endpoint {endpoint!r} already has {limit} open requests (--max-open-requests): requests assigned and not "
        "reported done, or waiting for a worker; retry later, or retry an open one with its request_idx"
    )


def url_taken(url: str, heartbeat_timeout_s: float) -> UrlTaken:
    """What ``report`` raises for a URL an active worker of another endpoint reports (the endpoint is not named: it
    is another tenant's)."""
    return UrlTaken(
        f"url {url!r} is reported by an active worker of another endpoint; it can take the url once that worker "
        f"reports state 'stopped' or stays silent for {heartbeat_timeout_s:g} s (--heartbeat-timeout-s)"
    )


class UnknownRequest(LookupError):
    """A retry named a request_idx this endpoint never issued (or one that expired)."""


@dataclass(frozen=True, slots=True)
class LoadStats:
    """Per endpoint, what the autoscaler needs besides the worker records."""

    load_rate: float  # workload units per second routed as new requests over the window
    outstanding: float  # workload units assigned and not yet released
    # requests answered "no ready worker" and polled within the window, and their workload (estimated past
    # WAITING_SAMPLE of them: waiting_load): demand that no worker's load shows
    waiting_requests: int = 0
    waiting: float = 0.0
    open_requests: int = 0  # assigned and not released, or waiting: what --max-open-requests caps


class DispatchStore(Protocol):
    async def route(
        self,
        endpoint: str,
        cost: float,
        request_idx: int | None,
        policy: PickPolicy,
        idempotency_key: str | None = None,
    ) -> RouteOutcome:
        """Pick a worker and reserve ``cost`` on it. ``request_idx``: a retry of that request (``UnknownRequest``
        when it is not held). Without one, ``idempotency_key`` names a new request; the same key again on this
        endpoint, while that request is held and unexpired, is the same call again (a client whose first answer was
        lost): that request, on the worker it has while that one can take work."""
        ...

    async def report(
        self, endpoint: str, report: WorkerReport, heartbeat_timeout_s: float = DEFAULT_HEARTBEAT_TIMEOUT_S
    ) -> WorkerRecord:
        """Record a worker's heartbeat (its load ledger and reqnum kept, but for the requests its ``reqnum_floor``
        gives back); ``TooManyWorkers`` for a new id on an endpoint at the store's cap.

        A URL is one worker's. Another record of the same endpoint reporting it (a worker restarted under a new id)
        is set to ``stopped``: its reqnums, below the new record's, would be refused by the new process. One of
        another endpoint is replaced the same way once it is stopped or silent for ``heartbeat_timeout_s``; while it
        is active the report is refused (``UrlTaken``)."""
        ...

    async def release(
        self,
        endpoint: str,
        request_idxs: Sequence[int],
        worker_id: str | None = None,
        retry_window_s: float = DEFAULT_RELEASED_RETRY_S,
    ) -> Released:
        """Give the requests' load back; each stays known, held by no worker, for ``retry_window_s`` more (at most
        until its ttl). With ``worker_id``, only requests that worker holds: a request a retry moved to another worker
        stays with that one when the first worker reports it done."""
        ...

    async def workers(self, endpoint: str) -> list[WorkerRecord]: ...

    async def endpoints(self) -> list[str]:
        """The endpoints holding worker records, sorted: configured or not (an endpoints file may have dropped one)."""
        ...

    async def forget_workers(self, endpoint: str, forget_s: float) -> int:
        """Remove the endpoint's workers not heard from for over ``forget_s`` that hold no request; how many went.
        Without it every worker that ever reported would be scanned by each route and counted forever."""
        ...

    async def load_stats(self, endpoint: str, window_s: float) -> LoadStats: ...

    async def now(self) -> float:
        """The store's clock (unix seconds): records' ``last_seen`` are on it."""
        ...

    async def ping(self) -> None:
        """Raise ``StoreUnavailable`` if the store cannot serve."""
        ...

    async def server_problems(self) -> list[str]:
        """What about the store's server would break the dispatcher's state (checked once at start, logged as
        warnings); ``StoreUnavailable`` when it cannot be asked."""
        ...

    async def close(self) -> None: ...

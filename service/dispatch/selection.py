"""Which worker gets a request: pure functions over worker records (the Redis Lua script mirrors them)."""

from __future__ import annotations

from collections.abc import Iterable

from service.dispatch.records import BUSY, INACTIVE, STATUS_KEYS, WorkerRecord, WorkerState


def pick_worker(
    workers: Iterable[WorkerRecord],
    *,
    now: float,
    heartbeat_timeout_s: float,
    max_queue_time_s: float,
    avoid: str | None = None,
    keep: str | None = None,
) -> WorkerRecord | None:
    """The ready, live worker where a new request would wait least (``load / max_perf``), if that wait is within
    ``max_queue_time_s``. Ties go to the lower load, then the fewer open requests (cost-0 requests spread too), then
    the lower worker id. ``avoid`` (the worker a retried request had) is never taken: with no other worker the retry
    is answered "no ready worker", and the client's poll, which avoids nothing, may take it. (Vast's SDK retries a
    connection error at once: given a dead worker again, each request looped on /route/ hundreds of times a second
    until the heartbeat timed the worker out.) ``keep`` (the worker a repeated request has) is taken whenever it is
    ready and live: the repeat of a call changes nothing the call did."""
    best: WorkerRecord | None = None
    best_key: tuple[float, float, int, str] | None = None
    for worker in workers:
        if worker.state is not WorkerState.READY or worker.max_perf <= 0:
            continue
        if not worker.active(now, heartbeat_timeout_s):
            continue
        if worker.worker_id == keep:
            return worker
        wait = worker.wait_s()
        if wait > max_queue_time_s or worker.worker_id == avoid:
            continue
        key = (wait, worker.load, worker.open_requests, worker.worker_id)
        if best_key is None or key < best_key:
            best, best_key = worker, key
    return best


def status_breakdown(
    workers: Iterable[WorkerRecord], *, now: float, heartbeat_timeout_s: float, max_queue_time_s: float
) -> dict[str, int]:
    """Workers by state, as a no-ready answer reports them: silent ones count as ``inactive``, ready ones whose
    queue is over ``max_queue_time_s`` as ``busy``."""
    counts = dict.fromkeys(STATUS_KEYS, 0)
    for worker in workers:
        if not worker.active(now, heartbeat_timeout_s):
            category = INACTIVE
        elif worker.state is WorkerState.READY and (worker.max_perf <= 0 or worker.wait_s() > max_queue_time_s):
            category = BUSY
        else:
            category = worker.state.value
        counts[category] += 1
    return counts

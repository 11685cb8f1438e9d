"""One client process's run: a closed loop (``concurrency`` requests always in flight) or an open loop (Poisson
arrivals at ``rate``), a warm-up, then a recorded window of fixed length, then a bounded drain.

A request is recorded when it was scheduled (open loop) or started (closed loop) inside the recorded window. Open
loop latency runs from the *scheduled* send time, so a server that falls behind is charged for the queue it causes.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Protocol

from benchmarks.loadgen.schedule import poisson_arrivals
from benchmarks.loadgen.stats import ProcessResult, Recorder
from benchmarks.loadgen.timing import Answer, now

# After an exception (refused, reset), a closed-loop connection waits this long before the next request, so a dead
# server costs a bounded error rate instead of a busy loop.
ERROR_BACKOFF_S = 0.01
# Open loop: arrivals due within this much of now are sent at once instead of sleeping for them.
SLEEP_GRANULARITY_S = 0.0002


class Client(Protocol):
    @property
    def connections_opened(self) -> int: ...

    async def send(self, index: int) -> Answer: ...

    async def aclose(self) -> None: ...


@dataclass(frozen=True)
class Plan:
    """What one process does. ``start_at`` is a ``time.time()`` shared by all processes of a run."""

    mode: str  # "closed" or "open"
    warmup_s: float
    duration_s: float
    drain_s: float
    concurrency: int = 0  # closed loop: requests in flight
    rate: float = 0.0  # open loop: arrivals per second
    seed: int = 0
    start_at: float = 0.0


class _Bodies:
    """Round-robin body indices, counting how often the list was used up (a unique-prompt run must not wrap)."""

    def __init__(self, count: int) -> None:
        self.count, self.next_index = count, 0

    def take(self) -> int:
        i = self.next_index
        self.next_index += 1
        return i % self.count

    @property
    def wraps(self) -> int:
        return max(0, self.next_index - 1) // self.count


class _Window:
    """The recorded window on the ``now`` clock, and the process's CPU time at its two ends."""

    def __init__(self, loop: asyncio.AbstractEventLoop, t0: float, plan: Plan) -> None:
        self.start = t0 + plan.warmup_s
        self.end = self.start + plan.duration_s
        self.cpu: list[float] = []
        self.wall: list[float] = []
        loop.call_later(self.start - now(), self._mark)
        loop.call_later(self.end - now(), self._mark)

    def _mark(self) -> None:
        self.cpu.append(time.process_time())
        self.wall.append(now())

    def close(self) -> None:
        """Mark the end now if its timer has not fired yet (uvloop's timers round to milliseconds)."""
        if len(self.cpu) == 1:
            self._mark()

    def cpu_s(self) -> float:
        return self.cpu[1] - self.cpu[0] if len(self.cpu) == 2 else 0.0

    def wall_s(self) -> float:
        return self.wall[1] - self.wall[0] if len(self.wall) == 2 else 0.0

    def arrived(self, rec: Recorder, status: int, at: float) -> None:
        """Count an answer towards the throughput if it arrived inside the window (whichever request it was)."""
        if self.start <= at < self.end:
            rec.arrived_in_window(status)


async def run_plan(client: Client, n_bodies: int, plan: Plan) -> ProcessResult:
    """Run ``plan`` with ``client`` and return what was recorded."""
    loop = asyncio.get_running_loop()
    late = max(0.0, time.time() - plan.start_at) if plan.start_at else 0.0
    t0 = now() + max(0.0, plan.start_at - time.time()) if plan.start_at else now()
    window = _Window(loop, t0, plan)
    bodies = _Bodies(n_bodies)
    rec = Recorder()
    if plan.mode == "closed":
        tasks, scheduled = _closed(client, bodies, rec, window, t0, plan), 0
    elif plan.mode == "open":
        tasks, scheduled = await _open(client, bodies, rec, window, t0, plan)
    else:
        raise ValueError(f"unknown mode {plan.mode!r}")
    unfinished = await _drain(tasks, plan.drain_s, window.end)
    window.close()
    return ProcessResult.from_recorder(
        rec,
        scheduled=scheduled,
        unfinished=unfinished,
        body_wraps=bodies.wraps,
        connections_opened=client.connections_opened,
        cpu_s=window.cpu_s(),
        window_s=window.wall_s(),
        late_start_s=late,
    )


def _closed(
    client: Client, bodies: _Bodies, rec: Recorder, window: _Window, t0: float, plan: Plan
) -> dict[asyncio.Task[None], bool]:
    """The workers, each mapped to whether its request in flight is a recorded one."""
    loop = asyncio.get_running_loop()
    tasks: dict[asyncio.Task[None], bool] = {}

    async def worker() -> None:
        task = asyncio.current_task()
        assert task is not None
        await asyncio.sleep(max(0.0, t0 - now()))
        while (start := now()) < window.end:
            recorded = tasks[task] = start >= window.start
            try:
                answer = await client.send(bodies.take())
            except Exception as exc:
                if recorded:
                    rec.error(exc)
                await asyncio.sleep(ERROR_BACKOFF_S)
                continue
            done = now()
            window.arrived(rec, answer.status, done)
            if recorded:
                rec.answer(answer.status, answer.nbytes, done - start)

    for _ in range(plan.concurrency):
        tasks[loop.create_task(worker())] = False
    return tasks


async def _open(
    client: Client, bodies: _Bodies, rec: Recorder, window: _Window, t0: float, plan: Plan
) -> tuple[dict[asyncio.Task[None], bool], int]:
    """Sends every arrival on schedule; returns the requests still in flight (each: is it recorded) and how many
    arrivals fell in the recorded window."""
    loop = asyncio.get_running_loop()
    arrivals = poisson_arrivals(plan.rate, plan.warmup_s + plan.duration_s, plan.seed)

    async def one(scheduled: float, recorded: bool) -> None:
        called = now()
        try:
            answer = await client.send(bodies.take())
        except Exception as exc:
            if recorded:
                rec.error(exc)
            return
        done = now()
        window.arrived(rec, answer.status, done)
        if recorded:
            # Latency counts from the earlier of the schedule and the start: from the schedule for a late start (the
            # wait a real client would have had), from the start for an early one (the loop's timers may fire up to
            # a millisecond before they are due, uvloop's resolution, and the schedule would under-report those).
            rec.sent(called - scheduled, answer.sent_at - called)
            rec.answer(answer.status, answer.nbytes, done - min(scheduled, called))

    tasks: dict[asyncio.Task[None], bool] = {}
    scheduled_in_window = 0
    for offset in arrivals.tolist():
        due = t0 + offset
        wait = due - now()
        if wait > SLEEP_GRANULARITY_S:
            await asyncio.sleep(wait)
        recorded = offset >= plan.warmup_s
        scheduled_in_window += recorded
        task = loop.create_task(one(due, recorded))
        tasks[task] = recorded
        task.add_done_callback(lambda t: tasks.pop(t, None))
    # Sleep out the window's tail so that the window's end mark fires before the drain.
    await asyncio.sleep(max(0.0, window.end - now()))
    return tasks, scheduled_in_window


async def _drain(tasks: dict[asyncio.Task[None], bool], drain_s: float, end: float) -> int:
    """Wait for in-flight requests (closed loop: the workers) until ``end + drain_s``; count recorded ones that
    did not finish, and cancel them."""
    pending = set(tasks)
    if pending:
        await asyncio.wait(pending, timeout=max(0.0, end + drain_s - now()))
    left = [t for t in pending if not t.done()]
    unfinished = sum(1 for t in left if tasks.get(t, False))
    for t in left:
        t.cancel()
    if left:
        await asyncio.gather(*left, return_exceptions=True)
    return unfinished

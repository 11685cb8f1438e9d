from __future__ import annotations

import asyncio
import logging
import os
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest

from service.errors import Overloaded, ShuttingDown
from service.metrics import RouterMetrics
from service.router import batcher
from service.router.batcher import BatcherConfig, MicroBatcher, lower_thread_priority


@dataclass(eq=False)
class Job:
    text: str
    enqueued_at: float = field(default_factory=time.monotonic)
    ids: list[int] | None = None
    future: asyncio.Future[str] = field(default_factory=lambda: asyncio.get_running_loop().create_future())

    def abandoned(self) -> bool:
        return self.future.done()


def own_niceness() -> int:
    return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())


class Harness:
    def __init__(self, *, size: int = 8, tokens: int = 1000, queue: int = 100, workers: int = 1,
                 delay_s: float = 0.02, fail_on: str | None = None, nice: int = 0) -> None:  # fmt: skip
        self.batches: list[list[str]] = []
        self.dropped: list[Job] = []
        self.computing = 0
        self.max_computing = 0
        self._lock = threading.Lock()
        self.tokenize_threads: set[str] = set()
        self.compute_threads: set[str] = set()
        self.niceness: dict[str, int] = {}  # stage -> the niceness its thread ran at
        self.delay_s = delay_s
        self.fail_on = fail_on
        self.metrics = RouterMetrics()
        self.batcher: MicroBatcher[Job, list[str]] = MicroBatcher(
            config=BatcherConfig(
                max_batch_size=size, max_batch_tokens=tokens, max_queue=queue, workers=workers, compute_nice=nice
            ),
            tokenize=self.tokenize,
            compute=self.compute,
            on_batch=self.on_batch,
            on_error=self.on_error,
            on_drop=self.dropped.append,
            metrics=self.metrics,
        )

    def tokenize(self, texts: list[str]) -> list[list[int]]:
        self.tokenize_threads.add(threading.current_thread().name)
        self.niceness["tokenize"] = own_niceness()
        return [list(range(len(t))) for t in texts]

    def compute(self, jobs: list[Job]) -> list[str]:
        with self._lock:
            self.compute_threads.add(threading.current_thread().name)
            self.niceness["compute"] = own_niceness()
            self.batches.append([j.text for j in jobs])
            self.computing += 1
            self.max_computing = max(self.max_computing, self.computing)
        time.sleep(self.delay_s)
        with self._lock:
            self.computing -= 1
        if self.fail_on is not None and any(j.text == self.fail_on for j in jobs):
            raise RuntimeError("boom")
        return [j.text.upper() for j in jobs]

    def on_batch(self, jobs: list[Job], result: list[str]) -> None:
        for job, value in zip(jobs, result, strict=True):
            if not job.future.done():
                job.future.set_result(value)

    def on_error(self, jobs: list[Job], error: BaseException) -> None:
        for job in jobs:
            if not job.future.done():
                job.future.set_exception(error)

    async def submit(self, text: str) -> Job:
        job = Job(text)
        self.batcher.submit(job)
        return job


async def test_batches_follow_load_and_every_job_is_answered() -> None:
    h = Harness(size=16)
    h.batcher.start()
    jobs = [await h.submit(f"p{i}") for i in range(100)]
    results = await asyncio.gather(*(j.future for j in jobs))
    assert results == [f"P{i}" for i in range(100)]
    assert max(len(b) for b in h.batches) > 1
    assert all(len(b) <= 16 for b in h.batches)
    assert sum(len(b) for b in h.batches) == 100
    # neither stage ran on the event loop thread
    assert h.tokenize_threads and all(n.startswith("tokenizer") for n in h.tokenize_threads)
    assert h.compute_threads and all(n.startswith("compute") for n in h.compute_threads)
    assert h.batcher.admitted == 0
    await h.batcher.close()


linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="per-thread niceness is Linux's")


@linux_only
async def test_compute_threads_run_at_a_lower_priority_than_the_loop_and_the_tokenizer() -> None:
    base = own_niceness()
    if base + 5 > 19:
        pytest.skip("the test process already runs at the lowest priority")
    h = Harness(workers=2, nice=5)
    h.batcher.start()
    assert await (await h.submit("p")).future == "P"
    assert h.niceness == {"tokenize": base, "compute": base + 5}
    assert own_niceness() == base  # the event loop's thread
    await h.batcher.close()


@linux_only
async def test_compute_nice_zero_leaves_the_compute_threads_alone() -> None:
    h = Harness(nice=0)
    h.batcher.start()
    await (await h.submit("p")).future
    assert h.niceness["compute"] == own_niceness()
    await h.batcher.close()


def run_in_thread(target: Callable[[], None]) -> None:
    thread = threading.Thread(target=target)
    thread.start()
    thread.join()


@linux_only
def test_lower_thread_priority_stops_at_the_lowest_priority() -> None:
    seen: list[int] = []

    def lowered() -> None:
        lower_thread_priority(40)
        seen.append(own_niceness())

    run_in_thread(lowered)
    assert seen == [19]


def test_lower_thread_priority_warns_when_the_kernel_refuses(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def refuse(*args: object) -> None:
        raise PermissionError("not permitted")

    monkeypatch.setattr(batcher.sys, "platform", "linux")  # getpriority runs; setpriority is the one refused
    monkeypatch.setattr(batcher.os, "setpriority", refuse)
    with caplog.at_level(logging.WARNING, logger=batcher.__name__):
        run_in_thread(lambda: lower_thread_priority(10))
    assert "compute thread keeps its priority: not permitted" in caplog.text


def test_lower_thread_priority_warns_off_linux(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(batcher.sys, "platform", "darwin")
    with caplog.at_level(logging.WARNING, logger=batcher.__name__):
        run_in_thread(lambda: lower_thread_priority(10))
    assert "per-thread niceness is Linux's" in caplog.text


async def test_idle_batcher_runs_a_lone_job_at_once() -> None:
    h = Harness(delay_s=0.0)
    h.batcher.start()
    job = await h.submit("solo")
    # with nothing else queued the batcher waits for no company: the lone prompt is its own batch
    assert await job.future == "SOLO"
    assert h.batches == [["solo"]]
    await h.batcher.close()


async def test_token_budget_cuts_batches() -> None:
    h = Harness(size=100, tokens=10, delay_s=0.05)
    h.batcher.start()
    first = await h.submit("x")  # occupies the worker so the rest queue up
    await asyncio.sleep(0.02)
    jobs = [await h.submit("abcd") for _ in range(6)]  # 4 tokens each
    await asyncio.gather(first.future, *(j.future for j in jobs))
    for batch in h.batches[1:]:
        assert sum(len(t) for t in batch) <= 10
    assert [len(b) for b in h.batches[1:]] == [2, 2, 2]
    await h.batcher.close()


async def test_abandoned_jobs_are_dropped_before_compute() -> None:
    h = Harness(delay_s=0.1)
    h.batcher.start()
    first = await h.submit("first")
    await asyncio.sleep(0.02)  # first is computing
    gone = [await h.submit(f"gone{i}") for i in range(5)]
    kept = await h.submit("kept")
    for job in gone:
        job.future.cancel()
    assert await kept.future == "KEPT"
    assert await first.future == "FIRST"
    computed = [t for b in h.batches for t in b]
    assert not any(t.startswith("gone") for t in computed)
    assert h.metrics.dropped._value.get() == 5
    assert h.dropped == gone  # each handed back, so that its owner can forget it
    assert h.batcher.admitted == 0
    await h.batcher.close()


async def test_full_queue_raises_overloaded() -> None:
    h = Harness(queue=3, delay_s=0.05)
    h.batcher.start()
    jobs = [await h.submit(f"p{i}") for i in range(3)]
    with pytest.raises(Overloaded) as info:
        await h.submit("one too many")
    assert info.value.status == 429
    assert info.value.retry_after
    await asyncio.gather(*(j.future for j in jobs))
    assert (await h.submit("room again")).text == "room again"  # admission frees as jobs finish
    await h.batcher.drain()
    await h.batcher.close()


async def test_a_failing_batch_fails_only_its_jobs_and_the_loop_goes_on() -> None:
    h = Harness(size=1, fail_on="bad")
    h.batcher.start()
    bad = await h.submit("bad")
    good = await h.submit("good")
    with pytest.raises(RuntimeError, match="boom"):
        await bad.future
    assert await good.future == "GOOD"
    after = await h.submit("after")
    assert await after.future == "AFTER"
    assert h.metrics.batch_failures._value.get() == 1
    await h.batcher.close()


async def test_several_workers_compute_batches_concurrently() -> None:
    h = Harness(size=4, workers=2, delay_s=0.1)
    h.batcher.start()
    jobs = [await h.submit(f"p{i}") for i in range(4)]
    await asyncio.gather(*(j.future for j in jobs))
    assert h.max_computing == 2  # both workers computed at the same time
    assert sum(len(b) for b in h.batches) == 4
    assert len(h.compute_threads) == 2
    await h.batcher.close()


async def test_drain_waits_for_admitted_work_then_refuses_new() -> None:
    h = Harness(delay_s=0.05)
    h.batcher.start()
    jobs = [await h.submit(f"p{i}") for i in range(10)]
    await h.batcher.drain()
    assert all(j.future.done() for j in jobs)
    with pytest.raises(ShuttingDown):
        await h.submit("late")
    await h.batcher.close()


async def test_a_batch_takes_its_share_of_what_waits() -> None:
    h = Harness(size=64, workers=2)
    for i in range(9):
        job = Job(f"p{i}", ids=[1, 2])
        h.batcher._ready.append(job)
    assert len(h.batcher._next_batch()) == 5  # ceil(9 / 2): the other worker gets the rest
    assert len(h.batcher._next_batch()) == 2  # ceil(4 / 2)
    single = Harness(size=64, workers=1)
    for i in range(9):
        single.batcher._ready.append(Job(f"p{i}", ids=[1]))
    assert len(single.batcher._next_batch()) == 9  # one worker (a GPU): everything that waits

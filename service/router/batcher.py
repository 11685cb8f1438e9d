"""Continuous micro-batching of prompts, as TEI does it.

Two stages, each in its own thread pool, so neither tokenization nor the forward pass ever runs on
the event loop:

    submit() --> [incoming] --tokenizer thread--> [ready] --compute workers--> on_batch()

* A batch starts as soon as a compute worker is free: no timer when idle. While the workers are
  busy, prompts pile up in ``ready`` and a freed worker takes its share of them (all of them when
  there is one worker, as on a GPU): batch size follows load.
* A batch is cut by ``max_batch_size`` prompts and ``max_batch_tokens`` tokens. The model packs a
  batch without padding and attends per equal-length run (see ``minilm.py``), so a batch costs
  its real tokens, not ``size x longest``.
* Jobs whose clients all went away are dropped before tokenization and again before compute.
* Admission is bounded: past ``max_queue`` prompts admitted and not finished, ``submit`` raises
  ``Overloaded`` (429 with Retry-After) instead of growing the queue.
* A failing batch fails only its own jobs; the loop keeps going.
* On Linux the compute threads can run at a lower priority (``compute_nice``): when the forward passes take every
  core, the event loop and the tokenizer, which every request waits on, still run at once rather than sharing a core
  with them.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar

from service.config import MAX_NICE
from service.errors import Overloaded, ShuttingDown
from service.metrics import RouterMetrics

logger = logging.getLogger(__name__)


class BatchJob(Protocol):
    text: str
    ids: list[int] | None
    enqueued_at: float

    def abandoned(self) -> bool:
        """True when nobody waits for the result any more."""
        ...


J = TypeVar("J", bound=BatchJob)
R = TypeVar("R")


@dataclass(frozen=True, kw_only=True)
class BatcherConfig:
    max_batch_size: int
    max_batch_tokens: int
    max_queue: int
    workers: int
    compute_nice: int = 0  # added to the compute threads' niceness (Linux; 0 leaves them as they are)


def lower_thread_priority(nice: int) -> None:
    """Add ``nice`` to the calling thread's niceness (Linux keeps one per thread; threads it starts later, such as
    OpenMP's, inherit it). Elsewhere, or where it fails, the thread keeps its priority, with a warning."""
    if nice <= 0:
        return
    if not sys.platform.startswith("linux"):
        logger.warning("compute threads keep their priority: per-thread niceness is Linux's")
        return
    tid = threading.get_native_id()
    try:
        os.setpriority(os.PRIO_PROCESS, tid, min(MAX_NICE, os.getpriority(os.PRIO_PROCESS, tid) + nice))
    except OSError as exc:
        logger.warning("compute thread keeps its priority: %s", exc)


class MicroBatcher(Generic[J, R]):
    """``compute`` runs in a worker thread on a batch; ``on_batch``/``on_error``/``on_drop`` run on the loop
    (``on_drop``: a job whose waiters all left, taken out of the queue without compute)."""

    def __init__(
        self,
        *,
        config: BatcherConfig,
        tokenize: Callable[[list[str]], list[list[int]]],
        compute: Callable[[list[J]], R],
        on_batch: Callable[[list[J], R], None],
        on_error: Callable[[list[J], BaseException], None],
        on_drop: Callable[[J], None],
        metrics: RouterMetrics,
    ) -> None:
        if config.max_batch_size < 1 or config.max_batch_tokens < 1 or config.max_queue < 1 or config.workers < 1:
            raise ValueError(f"invalid batcher config: {config}")
        self.config = config
        self._tokenize = tokenize
        self._compute = compute
        self._on_batch = on_batch
        self._on_error = on_error
        self._on_drop = on_drop
        self._metrics = metrics
        self._incoming: deque[J] = deque()
        self._ready: deque[J] = deque()
        self._incoming_event = asyncio.Event()
        self._idle_event = asyncio.Event()
        self._idle_event.set()
        self._admitted = 0
        self._running = 0
        self._closed = False
        self._maybe_abandoned = False  # a waiter left since the queue was last swept for jobs no one waits for
        self._tokenizer_pool = ThreadPoolExecutor(1, thread_name_prefix="tokenizer")
        self._compute_pool = ThreadPoolExecutor(
            config.workers,
            thread_name_prefix="compute",
            initializer=functools.partial(lower_thread_priority, config.compute_nice),
        )
        self._tokenizer_task: asyncio.Task[None] | None = None

    # -- public ---------------------------------------------------------------------------------
    def start(self) -> None:
        self._metrics.max_queue.set(self.config.max_queue)
        self._tokenizer_task = asyncio.ensure_future(self._tokenizer_loop())

    def submit(self, job: J) -> None:
        """Queue a job or raise ``Overloaded`` (queue full) / ``ShuttingDown`` (stopped)."""
        if self._closed:
            raise ShuttingDown("the router is shutting down")
        if self._admitted >= self.config.max_queue and self._maybe_abandoned:
            self._drop_abandoned()  # their slots belong to clients still here, not to ones that left
        if self._admitted >= self.config.max_queue:
            raise Overloaded(f"router queue is full ({self.config.max_queue} prompts); retry later")
        self._admitted += 1
        self._metrics.admitted.set(self._admitted)
        self._idle_event.clear()
        self._incoming.append(job)
        self._incoming_event.set()
        self._update_depth()

    def note_abandoned(self) -> None:
        """A waiter left: a job may have no one waiting any more. The next ``submit`` that finds the queue full
        drops such jobs first (a scan only then, not on every refusal)."""
        self._maybe_abandoned = True

    @property
    def admitted(self) -> int:
        return self._admitted

    @property
    def running(self) -> int:
        """Batches computing now (read from worker threads too: a plain int read)."""
        return self._running

    @property
    def queued(self) -> int:
        return len(self._incoming) + len(self._ready)

    async def drain(self) -> None:
        """Stop admitting; wait until every admitted job is finished."""
        self._closed = True
        await self._idle_event.wait()

    async def close(self) -> None:
        self._closed = True
        if self._tokenizer_task is not None:
            self._tokenizer_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._tokenizer_task
        self._tokenizer_pool.shutdown(wait=True, cancel_futures=True)
        self._compute_pool.shutdown(wait=True, cancel_futures=True)

    # -- stages -----------------------------------------------------------------------------------
    async def _tokenizer_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._incoming_event.wait()
            self._incoming_event.clear()
            jobs = self._take_live(self._incoming, limit=len(self._incoming))
            if not jobs:
                continue
            started = time.perf_counter()
            try:
                ids = await loop.run_in_executor(self._tokenizer_pool, self._tokenize, [job.text for job in jobs])
            except Exception as exc:
                logger.exception("tokenization failed for %d prompts", len(jobs))
                self._fail(jobs, exc)
                continue
            self._metrics.tokenize_duration.observe(time.perf_counter() - started)
            for job, seq in zip(jobs, ids, strict=True):
                job.ids = seq
            # clients may have left while their prompts were tokenized (where a full queue's sweep cannot see them)
            self._ready.extend(self._take_live(deque(jobs), limit=len(jobs)))
            self._dispatch()

    def _dispatch(self) -> None:
        """Start batches while a worker is free and prompts are ready (runs on the loop, no hop).

        Called when prompts become ready and, before its results are delivered, when a batch
        ends: a freed worker starts on what waits now instead of after the loop has sent every
        response of the finished batch.
        """
        loop = asyncio.get_running_loop()
        while self._running < self.config.workers and self._ready:
            batch = self._next_batch()
            if not batch:
                return
            self._running += 1
            started = time.monotonic()
            for job in batch:
                self._metrics.queue_wait.observe(started - job.enqueued_at)
            self._metrics.batch_size.observe(len(batch))
            self._metrics.batch_tokens.observe(sum(len(job.ids or ()) for job in batch))
            future = loop.run_in_executor(self._compute_pool, self._compute, batch)
            future.add_done_callback(functools.partial(self._computed, batch))

    def _computed(self, batch: list[J], future: asyncio.Future[R]) -> None:
        self._running -= 1
        self._dispatch()
        if future.cancelled():
            self._fail(batch, ShuttingDown("the router is shutting down"))
        elif (error := future.exception()) is not None:
            self._metrics.batch_failures.inc()
            logger.error("batch of %d prompts failed", len(batch), exc_info=error)
            self._fail(batch, error)
        else:
            self._deliver(batch, future.result())

    # -- helpers ----------------------------------------------------------------------------------
    def _next_batch(self) -> list[J]:
        """FIFO up to the size and token caps; the first job always fits (it is <= max_seq_length).

        With several workers a batch takes only its share of what waits (``ceil(ready / workers)``):
        taking everything would leave the other workers idle until this batch is done.
        """
        share = -(-len(self._ready) // self.config.workers)
        limit = min(self.config.max_batch_size, max(1, share))
        batch: list[J] = []
        tokens = 0
        while self._ready and len(batch) < limit:
            job = self._ready[0]
            if job.abandoned():
                self._ready.popleft()
                self._drop(job)
                continue
            size = len(job.ids or ())
            if batch and tokens + size > self.config.max_batch_tokens:
                break
            self._ready.popleft()
            batch.append(job)
            tokens += size
        self._update_depth()
        return batch

    def _take_live(self, queue: deque[J], limit: int) -> list[J]:
        jobs: list[J] = []
        for _ in range(limit):
            job = queue.popleft()
            if job.abandoned():
                self._drop(job)
            else:
                jobs.append(job)
        self._update_depth()
        return jobs

    def _drop_abandoned(self) -> None:
        self._maybe_abandoned = False
        for queue in (self._incoming, self._ready):
            queue.extend(self._take_live(queue, limit=len(queue)))  # the live ones go back, in their order

    def _drop(self, job: J) -> None:
        self._metrics.dropped.inc()
        try:
            self._on_drop(job)
        except Exception:
            logger.exception("dropping a job failed")
        self._release(1)

    def _deliver(self, jobs: list[J], result: R) -> None:
        try:
            self._on_batch(jobs, result)
        except Exception:
            logger.exception("delivering batch results failed")
            self._fail(jobs, RuntimeError("delivering batch results failed"), release=False)
        self._release(len(jobs))

    def _fail(self, jobs: list[J], error: BaseException, *, release: bool = True) -> None:
        try:
            self._on_error(jobs, error)
        except Exception:
            logger.exception("failing a batch failed")
        if release:
            self._release(len(jobs))

    def _release(self, count: int) -> None:
        self._admitted -= count
        self._metrics.admitted.set(self._admitted)
        if self._admitted == 0:
            self._idle_event.set()

    def _update_depth(self) -> None:
        self._metrics.queue_depth.set(self.queued)

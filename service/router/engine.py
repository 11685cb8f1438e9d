"""The routing pipeline: cache -> singleflight -> micro-batcher (embed + search) -> scoring.

    route(request)
      |- embedding given ......... search it now (one 100 x 384 product), score
      |- prompt in the LRU ....... score the cached nearest clusters (cache_hit = true)
      |- same prompt in flight ... join that job (singleflight)
      `- else ..................... queue a job; its batch embeds, searches FAISS once, and
                                    scores every waiter of the batch in one vectorised call

Everything here but ``_compute`` runs on the event loop; ``_compute`` runs in a batcher thread.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from prometheus_client import Counter

from service.config import RouterSettings, usable_cores
from service.errors import InvalidRequest, NotReady, ShuttingDown
from service.metrics import RELOAD_OK, RELOAD_REJECTED, RouterMetrics, multiprocess
from service.router.batcher import BatcherConfig, MicroBatcher
from service.router.cache import LRUCache
from service.router.index import Nearest
from service.router.schemas import RouteDecision, RouteRequest
from service.router.scoring import Verdict, verdict
from service.router.state import RouterState, StateHolder
from service.router.weights import RouterWeights, WeightsError, check_embedder, load_weights

if TYPE_CHECKING:  # torch loads in the background, after the server listens (see model_card.py)
    from service.router.embedder import Embedder

logger = logging.getLogger(__name__)

CACHE_KEY_BYTES = 16
MAX_NAMES_IN_ERROR = 20  # model names an unknown-model error lists before '(+N more)'
MAX_NAME_CHARS_IN_ERROR = 100


@dataclass(frozen=True)
class RouteQuery:
    """A request checked against one weights snapshot."""

    state: RouterState
    cost_weight: float
    columns: tuple[int, ...]  # the candidates' columns in the score table, ascending
    default: bool  # the weights' lambda over every model: ``state.default_verdicts`` holds its outcomes

    @classmethod
    def build(cls, request: RouteRequest, state: RouterState) -> RouteQuery:
        if request.available_models is not None:
            unknown = [name for name in request.available_models if name not in state.model_index]
            if unknown:
                raise InvalidRequest(
                    f"unknown model(s) in 'available_models': {_some_names(unknown)}; "
                    f"known: {_some_names(state.weights.models)}"
                )
        weight = state.weights.default_lambda if request.cost_weight is None else request.cost_weight
        columns = state.allowed_columns(request.available_models)
        default = weight == state.weights.default_lambda and columns == state.table_columns
        return cls(state=state, cost_weight=weight, columns=columns, default=default)


def _some_names(names: Sequence[str]) -> str:
    """The first few names (each cut short), then how many more: an error must not echo a megabyte request back."""
    shown = [repr(name if len(name) <= MAX_NAME_CHARS_IN_ERROR else name[:MAX_NAME_CHARS_IN_ERROR] + "...")
             for name in names[:MAX_NAMES_IN_ERROR]]  # fmt: skip
    more = len(names) - len(shown)
    return ", ".join(shown) + (f" (+{more} more)" if more else "")


@dataclass(eq=False)
class Waiter:
    query: RouteQuery
    future: asyncio.Future[RouteDecision]
    lookup_s: float  # time spent in the cache lookup before queueing
    joined_at: float  # time.monotonic() when it queued, or joined a job already queued or computing


@dataclass(eq=False)
class PromptJob:
    key: bytes
    text: str
    enqueued_at: float
    ids: list[int] | None = None
    waiters: list[Waiter] = field(default_factory=list)

    def abandoned(self) -> bool:
        return all(w.future.done() for w in self.waiters)


@dataclass(frozen=True)
class BatchResult:
    state: RouterState
    embeddings: np.ndarray  # [B, dim]
    nearest: Nearest
    started: float  # monotonic, when compute began
    embedding_s: float
    search_s: float


# A cached prompt's nearest clusters: (cluster ids [k], similarity [k]). A plain tuple of arrays, not a class: the
# garbage collector stops tracking a tuple of untracked objects (an exact tuple only), and then the LRU's entry
# around it, so 100,000 cached prompts add nothing for a full collection to walk (``service/http/heap.py``).
CachedRoute = tuple[np.ndarray, np.ndarray]


class RouterEngine:
    def __init__(
        self, *, embedder: Embedder, holder: StateHolder, settings: RouterSettings, metrics: RouterMetrics
    ) -> None:
        self._embedder = embedder
        self._holder = holder
        self._metrics = metrics
        self._top_k = max(1, settings.top_clusters)
        self._cache: LRUCache[CachedRoute] = LRUCache(max_entries=settings.cache_size, ttl_s=settings.cache_ttl_s)
        self._inflight: dict[bytes, PromptJob] = {}
        self._reload_lock = asyncio.Lock()
        self._index_backend = settings.index_backend
        workers = compute_workers(settings, embedder.device)
        self._cpu = embedder.device.startswith("cpu")
        self._cores = usable_cores()
        self._workers = workers
        self._batcher: MicroBatcher[PromptJob, BatchResult] = MicroBatcher(
            config=BatcherConfig(
                max_batch_size=settings.max_batch_size,
                max_batch_tokens=settings.max_batch_tokens,
                max_queue=settings.max_queue,
                workers=workers,
                compute_nice=settings.compute_nice if self._cpu else 0,
            ),
            tokenize=embedder.tokenize,
            compute=self._compute,
            on_batch=self._on_batch,
            on_error=self._on_error,
            on_drop=self._forget,  # its clients all left: a later identical prompt makes a new job
            metrics=metrics,
        )
        # prometheus label lookups cost microseconds; keep the children
        self._selection_counters: dict[str, Counter] = {}
        self._cluster_counters: dict[int, Counter] = {}

    # -- lifecycle ------------------------------------------------------------------------------
    def start(self) -> None:
        self._batcher.start()

    async def drain(self) -> None:
        await self._batcher.drain()

    async def close(self) -> None:
        await self._batcher.close()

    @property
    def admitted(self) -> int:
        """Prompts queued or computing (what ``max_queue`` bounds)."""
        return self._batcher.admitted

    @property
    def dim(self) -> int:
        """The embedding width the weights and the index take (checked against the embedder's at load)."""
        return self._embedder.dim

    # -- routing --------------------------------------------------------------------------------
    def route_or_queue(self, request: RouteRequest) -> RouteDecision | asyncio.Future[RouteDecision]:
        """The decision itself when the clusters are known at once (a supplied embedding, a cached
        prompt), else a future for it once the prompt's batch has run. No await on the fast answers: the
        HTTP layer answers them without a task or a disconnect watch (``api.route``)."""
        state = self._holder.current()
        if state is None:
            raise NotReady("router weights are not loaded yet")
        query = RouteQuery.build(request, state)
        started = time.perf_counter()
        if request.embedding is not None:
            nearest = state.index.search(request.embedding[None, :], self._top_k)
            return self._decide_now(state, query, nearest.ids[0], nearest.similarity[0], False, started)
        assert request.prompt is not None
        # What the embedder embeds (sentence-transformers strips each input): prompts that differ only in leading or
        # trailing whitespace share one cache entry and one job.
        text = request.prompt.strip()
        key = hashlib.blake2b(text.encode(), digest_size=CACHE_KEY_BYTES).digest()
        cached = self._cache.get((state.generation, key))
        if cached is not None:
            self._metrics.cache_hits.inc()
            return self._decide_now(state, query, *cached, True, started)
        job = self._inflight.get(key)
        now = time.monotonic()
        if job is None or job.abandoned():
            job = PromptJob(key=key, text=text, enqueued_at=now)
            self._batcher.submit(job)  # raises when the queue is full: a refusal, not a lookup that computes
            self._inflight[key] = job
        else:
            self._metrics.singleflight_joins.inc()
        self._metrics.cache_misses.inc()
        waiter = Waiter(query, asyncio.get_running_loop().create_future(), time.perf_counter() - started, now)
        waiter.future.add_done_callback(self._on_waiter_done)
        job.waiters.append(waiter)
        # Cancelling this future (client gone) leaves the job without a live waiter: the batcher drops
        # it before compute.
        return waiter.future

    async def route(self, request: RouteRequest) -> RouteDecision:
        outcome = self.route_or_queue(request)
        return outcome if isinstance(outcome, RouteDecision) else await outcome

    def _decide_now(
        self, state: RouterState, query: RouteQuery, ids: np.ndarray, sims: np.ndarray, cache_hit: bool, started: float
    ) -> RouteDecision:
        """One request whose clusters are already known (cache hit or supplied embedding)."""
        outcome = self._outcome(state, query, int(ids[0]))
        return self._decision(state, query, outcome, ids, sims, cache_hit=cache_hit,
                              routing_s=time.perf_counter() - started)  # fmt: skip

    def _outcome(self, state: RouterState, query: RouteQuery, cluster: int) -> Verdict:
        """The query's verdict on its cluster: the weights' default verdict for the default query (scored once per
        weights), else scored for this query."""
        if query.default:
            return state.default_verdicts[cluster]
        return verdict(state.table, cluster, query.cost_weight, query.columns)

    def _decision(
        self,
        state: RouterState,
        query: RouteQuery,
        outcome: Verdict,
        ids: np.ndarray,
        sims: np.ndarray,
        *,
        cache_hit: bool,
        routing_s: float,
        embedding_s: float = 0.0,
        queue_s: float = 0.0,
    ) -> RouteDecision:
        """The answer for one request (either path), counted in the routing metrics."""
        cluster = int(ids[0])
        self._metrics.routing_duration.observe(routing_s)
        self._count(outcome.selected, cluster)
        return RouteDecision(
            selected_model=outcome.selected,
            cluster_id=cluster,
            expected_error=outcome.expected_error,
            cost_adjusted_score=outcome.score,
            all_scores=outcome.all_scores,
            cache_hit=cache_hit,
            routing_ms=routing_s * 1e3,
            embedding_ms=embedding_s * 1e3,
            queue_ms=queue_s * 1e3,
            cost_weight=query.cost_weight,
            clusters=list(zip(ids.tolist(), sims.tolist(), strict=True)),
            weights_version=state.weights.version,
        )

    def _compute(self, jobs: list[PromptJob]) -> BatchResult:
        """Worker thread: one forward pass and one FAISS search for the whole batch."""
        state = self._holder.current()
        assert state is not None
        started = time.monotonic()
        t0 = time.perf_counter()
        embeddings = self._embedder.embed_ids([job.ids or [] for job in jobs], cpu_threads=self._cpu_threads())
        t1 = time.perf_counter()
        nearest = state.index.search(embeddings, self._top_k)
        t2 = time.perf_counter()
        self._metrics.embedding_duration.observe(t1 - t0)
        return BatchResult(
            state=state, embeddings=embeddings, nearest=nearest, started=started, embedding_s=t1 - t0, search_s=t2 - t1
        )

    def _cpu_threads(self) -> int | None:
        """A lone batch with nothing waiting gets every core (lowest latency); under load each
        worker keeps to its share, since oversubscribed OpenMP teams stall on each other."""
        if not self._cpu:
            return None
        if self._batcher.running <= 1 and self._batcher.queued == 0:
            return self._cores
        return max(1, self._cores // self._workers)

    def _on_batch(self, jobs: list[PromptJob], result: BatchResult) -> None:
        """Event loop: cache the clusters, then score every live waiter of the batch at once."""
        by_state: dict[int, tuple[RouterState, list[Waiter], list[int]]] = {}
        ids, sims = result.nearest.ids, result.nearest.similarity
        for row, job in enumerate(jobs):
            self._forget(job)
            self._cache.put((result.state.generation, job.key), (ids[row].copy(), sims[row].copy()))
            for waiter in job.waiters:
                if waiter.future.done():
                    continue
                state = waiter.query.state
                group = by_state.setdefault(state.generation, (state, [], []))
                group[1].append(waiter)
                group[2].append(row)
        for state, waiters, rows in by_state.values():
            if state is result.state:
                found_ids, found_sims = ids[rows], sims[rows]
            else:  # the weights were swapped during this batch: use the waiter's own snapshot
                again = state.index.search(result.embeddings[rows], self._top_k)
                found_ids, found_sims = again.ids, again.similarity
            decisions = self._decide(
                state,
                [w.query for w in waiters],
                found_ids,
                found_sims,
                # each waiter's own share: one that joined a job while it computed did not wait for the batch, nor
                # for the part of the forward pass before it came
                embedding_s=[max(0.0, result.embedding_s - max(0.0, w.joined_at - result.started)) for w in waiters],
                queue_s=[result.started - w.joined_at for w in waiters],
                routing_s=[result.search_s + w.lookup_s for w in waiters],
            )
            for waiter, decision in zip(waiters, decisions, strict=True):
                if not waiter.future.done():
                    waiter.future.set_result(decision)

    def _on_waiter_done(self, future: asyncio.Future[RouteDecision]) -> None:
        if future.cancelled():  # its client left: the job may now be one no one waits for
            self._batcher.note_abandoned()

    def abort_waiting(self, error: ShuttingDown) -> int:
        """Fail every request still waiting for a batch with ``error`` (a JSON 503 each), so that a drain that
        ran out of time answers them instead of leaving the server to cut their connections. Their prompts are
        then abandoned: the batcher drops them before compute. Returns how many requests were failed."""
        failed = 0
        for job in list(self._inflight.values()):
            for waiter in job.waiters:
                if not waiter.future.done():
                    waiter.future.set_exception(error)
                    failed += 1
        self._inflight.clear()
        return failed

    def _forget(self, job: PromptJob) -> None:
        """Out of the singleflight map, unless a newer job for the same prompt took its place (it had been
        abandoned): batched, failed or dropped, a job must leave it, or it and its text stay for good."""
        if self._inflight.get(job.key) is job:
            del self._inflight[job.key]

    def _on_error(self, jobs: list[PromptJob], error: BaseException) -> None:
        for job in jobs:
            self._forget(job)
            for waiter in job.waiters:
                if not waiter.future.done():
                    waiter.future.set_exception(RuntimeError(f"embedding failed: {error}"))

    def _decide(
        self,
        state: RouterState,
        queries: list[RouteQuery],
        cluster_ids: np.ndarray,
        similarity: np.ndarray,
        *,
        embedding_s: list[float],
        queue_s: list[float],
        routing_s: list[float],
    ) -> list[RouteDecision]:
        """A batch's live waiters, each scored as an answer on the spot is (``_outcome``)."""
        decisions = []
        for i, query in enumerate(queries):
            started = time.perf_counter()
            outcome = self._outcome(state, query, int(cluster_ids[i, 0]))
            routing = routing_s[i] + time.perf_counter() - started
            decisions.append(
                self._decision(state, query, outcome, cluster_ids[i], similarity[i], cache_hit=False,
                               routing_s=routing, embedding_s=embedding_s[i], queue_s=max(0.0, queue_s[i]))
            )  # fmt: skip
        return decisions

    def _count(self, model: str, cluster: int) -> None:
        counter = self._selection_counters.get(model)
        if counter is None:
            counter = self._selection_counters[model] = self._metrics.selections.labels(model=model)
        counter.inc()
        cluster_counter = self._cluster_counters.get(cluster)
        if cluster_counter is None:
            cluster_counter = self._cluster_counters[cluster] = self._metrics.cluster_requests.labels(
                cluster=str(cluster)
            )
        cluster_counter.inc()

    # -- weights --------------------------------------------------------------------------------
    async def reload(self, path: Path) -> RouterWeights:
        """Validate a weights file off the loop, swap it in atomically, clear the cache.

        On any problem the old weights keep serving and ``WeightsError`` is raised.
        """
        async with self._reload_lock:
            state = await self.validate(path)
            self.install(state)
            self._metrics.reloads.labels(result=RELOAD_OK).inc()
            return state.weights

    async def validate(self, path: Path) -> RouterState:
        """Build the serving state of a weights file off the loop without installing it; ``WeightsError`` (counted as
        a rejected reload) if it cannot serve."""
        try:
            return await asyncio.to_thread(build_state, path, self._embedder, index_backend=self._index_backend)
        except WeightsError:
            self._metrics.reloads.labels(result=RELOAD_REJECTED).inc()
            raise

    def install(self, state: RouterState) -> None:
        previous = self._holder.swap(state)
        self._cache.clear()
        if previous is not None:
            old = _weights_labels(previous.weights)
            self._metrics.weights_info.labels(*old).set(0)  # with several processes the merged files keep the value
            if not multiprocess():  # (where removing a series is not implemented, and warns)
                self._metrics.weights_info.remove(*old)
        self._metrics.weights_info.labels(*_weights_labels(state.weights)).set(1)
        logger.info(
            "serving weights %s (%d models, %d clusters)",
            state.weights.version,
            state.weights.num_models,
            state.weights.num_clusters,
        )


def build_state(path: Path, embedder: Embedder, *, index_backend: str = "auto") -> RouterState:
    """Load + validate a weights file against the running embedder; build its index (on the
    embedder's device for the torch backend)."""
    weights = load_weights(path)
    if weights.dim != embedder.dim:
        raise WeightsError(f"{path}: centroids are {weights.dim}-d, the embedder gives {embedder.dim}-d")
    check_embedder(weights, embedder.model_id, embedder.model_sha256, source=str(path))
    return RouterState.build(weights, index_backend=index_backend, device=embedder.device, kernels=embedder.kernels)


def compute_workers(settings: RouterSettings, device: str) -> int:
    """CPU: one worker per core; under load each forward pass gets one core, which beats one pass on
    all cores (small GEMMs scale poorly across cores). CUDA: ``cuda_inflight_batches`` (2): the GPU
    runs one batch at a time, a second worker packs the next one meanwhile (see cuda_encoder.py)."""
    if not device.startswith("cpu"):
        return max(1, settings.cuda_inflight_batches)
    return settings.compute_threads or usable_cores()


def _weights_labels(weights: RouterWeights) -> tuple[str, str, str]:
    return weights.version, str(weights.num_models), str(weights.num_clusters)

from __future__ import annotations

import asyncio
import dataclasses
import gc
import threading
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import numpy as np
import pytest

from service.config import RouterSettings
from service.errors import InvalidRequest, NotReady, Overloaded
from service.metrics import RouterMetrics
from service.router import engine as engine_module
from service.router.engine import RouterEngine, build_state
from service.router.index import CentroidSearch, Nearest
from service.router.schemas import RouteRequest
from service.router.scoring import verdict
from service.router.state import RouterState, StateHolder
from service.router.weights import WeightsError, save_weights
from tests.fakes import DIM, FakeEmbedder, toy_weights


def request(prompt: str | None = None, *, embedding: np.ndarray | None = None, models: list[str] | None = None,
            cost_weight: float | None = None) -> RouteRequest:  # fmt: skip
    return RouteRequest(prompt=prompt, embedding=embedding, available_models=models, cost_weight=cost_weight)


def make_engine(embedder: FakeEmbedder, **overrides: object) -> tuple[RouterEngine, RouterMetrics]:
    settings = RouterSettings.from_env({}, compute_threads=1, **overrides)
    metrics = RouterMetrics()
    holder = StateHolder()
    engine = RouterEngine(embedder=embedder, holder=holder, settings=settings, metrics=metrics)
    engine.install(RouterState.build(toy_weights()))
    engine.start()
    return engine, metrics


@pytest.fixture
async def engine() -> AsyncIterator[tuple[RouterEngine, FakeEmbedder, RouterMetrics]]:
    embedder = FakeEmbedder()
    eng, metrics = make_engine(embedder)
    yield eng, embedder, metrics
    await eng.close()


async def test_prompt_is_routed_on_its_cluster(engine: tuple[RouterEngine, FakeEmbedder, RouterMetrics]) -> None:
    eng, _, _ = engine
    decision = await eng.route(request("c3 some prompt", cost_weight=0.0))
    assert decision.cluster_id == 3
    assert decision.selected_model == "big"  # quality first
    assert decision.expected_error == pytest.approx(0.1)
    assert decision.cost_adjusted_score == pytest.approx(0.1)
    assert decision.all_scores == pytest.approx({"big": 0.1, "cheap": 0.6, "mid": 0.3})
    assert decision.cache_hit is False
    assert decision.embedding_ms >= 0 and decision.routing_ms > 0
    assert decision.clusters[0][0] == 3 and len(decision.clusters) == 3


async def test_cost_weight_and_default_lambda(engine: tuple[RouterEngine, FakeEmbedder, RouterMetrics]) -> None:
    eng, _, _ = engine
    # lambda 1: big 0.1+1.0, mid 0.3+0.1, cheap 0.6+0.01 -> mid; lambda 5: 5.1, 0.8, 0.65 -> cheap
    assert (await eng.route(request("c2 x", cost_weight=1.0))).selected_model == "mid"
    assert (await eng.route(request("c2 x", cost_weight=5.0))).selected_model == "cheap"
    default = await eng.route(request("c2 y"))
    assert default.cost_weight == 0.1
    # lambda 0.1: big 0.1+0.1=0.2, mid 0.3+0.01=0.31, cheap 0.6+0.001 -> big
    assert default.selected_model == "big"


async def test_tie_goes_to_the_cheaper_model(engine: tuple[RouterEngine, FakeEmbedder, RouterMetrics]) -> None:
    eng, _, _ = engine
    decision = await eng.route(request("c0 tie", cost_weight=0.0))  # every model has error 0.2 on cluster 0
    assert decision.selected_model == "cheap"


async def test_available_models_restricts_and_unknown_names_are_named(
    engine: tuple[RouterEngine, FakeEmbedder, RouterMetrics],
) -> None:
    eng, _, _ = engine
    decision = await eng.route(request("c3 x", models=["cheap", "mid"], cost_weight=0.0))
    assert decision.selected_model == "mid"
    assert set(decision.all_scores) == {"cheap", "mid"}
    with pytest.raises(InvalidRequest, match=r"'nope'.*'gone'"):
        await eng.route(request("c3 x", models=["mid", "nope", "gone"]))
    # a request of 80,000 made-up names (and a megabyte-long one) is not echoed back whole
    with pytest.raises(InvalidRequest) as info:
        await eng.route(request("c3 x", models=["x" * 1_000_000] + [f"u{i}" for i in range(80_000)]))
    assert len(info.value.message) < 2_000 and "(+79981 more)" in info.value.message


async def test_embedding_input_skips_the_embedder(engine: tuple[RouterEngine, FakeEmbedder, RouterMetrics]) -> None:
    eng, embedder, _ = engine
    vector = np.zeros(DIM, dtype=np.float32)
    vector[5] = 1.0
    decision = await eng.route(request(embedding=vector, cost_weight=0.0))
    assert decision.cluster_id == 5
    assert decision.embedding_ms == 0.0
    assert embedder.texts_embedded == 0


@pytest.mark.parametrize(
    ("cost_weight", "models", "default"),
    [
        (None, None, True),
        (0.1, None, True),  # the weights' lambda, given
        (None, ["mid", "cheap", "big"], True),  # every model, listed
        (0.0, None, False),
        (None, ["big", "mid"], False),
    ],
)
async def test_answers_on_the_spot_read_the_default_verdicts_only_for_the_default_query(
    engine: tuple[RouterEngine, FakeEmbedder, RouterMetrics],
    monkeypatch: pytest.MonkeyPatch,
    cost_weight: float | None,
    models: list[str] | None,
    default: bool,
) -> None:
    """The weights' lambda over every model (however the request spells it) is scored once per weights; any other
    query is scored for itself, and both give what scoring the request would."""
    eng, _, _ = engine
    state = eng._holder.current()
    assert state is not None
    scored: list[int] = []
    score = engine_module.verdict

    def counting_verdict(*args: object) -> object:
        scored.append(1)
        return score(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(engine_module, "verdict", counting_verdict)
    for cluster in range(DIM):
        vector = np.zeros(DIM, dtype=np.float32)
        vector[cluster] = 1.0
        decision = await eng.route(request(embedding=vector, models=models, cost_weight=cost_weight))
        weight = 0.1 if cost_weight is None else cost_weight
        columns = state.allowed_columns(models)
        expected = score(state.table, cluster, weight, columns)
        assert (decision.selected_model, decision.expected_error, decision.cost_adjusted_score) == expected[:3]
        assert decision.all_scores == expected.all_scores
        # the default query's answers share their cluster's dict, by design (``RouteDecision.all_scores``)
        assert (decision.all_scores is state.default_verdicts[cluster].all_scores) is default
    assert len(scored) == (0 if default else DIM)


async def test_batched_prompts_are_scored_as_answers_on_the_spot_are(
    engine: tuple[RouterEngine, FakeEmbedder, RouterMetrics],
) -> None:
    """One scoring for both paths: a batched default query reads its cluster's default verdict, any other is
    scored for itself, with the same numbers an answer on the spot gets."""
    eng, _, _ = engine
    state = eng._holder.current()
    assert state is not None
    batched = await asyncio.gather(eng.route(request("c3 default")), eng.route(request("c3 own", cost_weight=5.0)))
    assert [d.cache_hit for d in batched] == [False, False]
    assert batched[0].all_scores is state.default_verdicts[3].all_scores
    own = batched[1]
    assert (own.selected_model, own.expected_error, own.cost_adjusted_score, own.all_scores) == verdict(
        state.table, 3, 5.0, state.table_columns
    )


def test_default_verdicts_are_scored_when_the_state_is_built() -> None:
    state = RouterState.build(toy_weights(default_lambda=5.0))
    assert "default_verdicts" in vars(state)  # cached_property: already computed
    assert [v.selected for v in state.default_verdicts] == ["cheap"] * DIM  # lambda 5: 0.6 + 0.05 beats the rest
    assert state.default_verdicts[3] == verdict(state.table, 3, 5.0, (0, 1, 2))


async def test_cache_hit_on_repeat(engine: tuple[RouterEngine, FakeEmbedder, RouterMetrics]) -> None:
    eng, embedder, metrics = engine
    first = await eng.route(request("c4 repeat me"))
    second = await eng.route(request("c4 repeat me", cost_weight=0.0))
    assert (first.cache_hit, second.cache_hit) == (False, True)
    assert second.cluster_id == first.cluster_id == 4
    assert second.embedding_ms == 0.0
    assert embedder.texts_embedded == 1
    assert metrics.cache_hits._value.get() == 1
    assert metrics.cache_misses._value.get() == 1


async def test_cached_prompts_leave_nothing_for_the_garbage_collector_to_walk(
    engine: tuple[RouterEngine, FakeEmbedder, RouterMetrics],
) -> None:
    eng, _, _ = engine
    for i in range(20):
        await eng.route(request(f"c{i % 8} prompt {i}"))
    entries = list(eng._cache._entries.items())
    assert len(entries) == 20
    gc.collect()
    gc.collect()  # a tuple is untracked once what it holds is: the inner (ids, similarity) first, then the entry
    assert not any(gc.is_tracked(key) or gc.is_tracked(entry) for key, entry in entries)
    hit = await eng.route(request("c3 prompt 3"))
    assert hit.cache_hit and hit.cluster_id == 3


@pytest.mark.parametrize(("device", "expected"), [("cpu", 7), ("cuda:0", 0)])
async def test_compute_nice_reaches_the_batcher_on_cpu_only(device: str, expected: int) -> None:
    embedder = FakeEmbedder()
    embedder.device = device
    eng, _ = make_engine(embedder, compute_nice=7)
    assert eng._batcher.config.compute_nice == expected
    await eng.close()


async def test_the_cache_size_and_ttl_settings_reach_the_engine_cache() -> None:
    embedder = FakeEmbedder()
    eng, _ = make_engine(embedder, cache_size=2, cache_ttl_s=1.0)
    hits = [(await eng.route(request(f"c1 {name}"))).cache_hit for name in "abacda"]
    # two entries: a and b, a hit; c evicts b, d evicts a (c was used later), so the last a is computed again
    assert hits == [False, False, True, False, False, False]
    assert (await eng.route(request("c1 a"))).cache_hit
    await asyncio.sleep(1.1)  # past the ttl
    assert not (await eng.route(request("c1 a"))).cache_hit
    assert embedder.texts_embedded == 6
    await eng.close()


async def test_singleflight_shares_one_computation() -> None:
    embedder = FakeEmbedder(delay_s=0.05)
    eng, metrics = make_engine(embedder)
    decisions = await asyncio.gather(*(eng.route(request("c6 same prompt", cost_weight=w)) for w in (0.0, 0.5, 5.0)))
    assert embedder.texts_embedded == 1
    assert [d.cluster_id for d in decisions] == [6, 6, 6]
    assert [d.selected_model for d in decisions] == ["big", "mid", "cheap"]  # each waiter scored with its own lambda
    assert metrics.singleflight_joins._value.get() == 2
    await eng.close()


async def test_departed_client_prompt_is_not_computed() -> None:
    embedder = FakeEmbedder(delay_s=0.1)
    eng, metrics = make_engine(embedder)
    busy = asyncio.ensure_future(eng.route(request("c1 busy")))
    await asyncio.sleep(0.03)
    gone = asyncio.ensure_future(eng.route(request("c2 gone")))
    await asyncio.sleep(0.01)
    gone.cancel()
    await busy
    await asyncio.sleep(0.15)
    assert embedder.texts_embedded == 1
    assert metrics.dropped._value.get() == 1
    assert eng.admitted == 0
    # nor kept: the singleflight map held every dropped prompt's job (and text) for good
    assert eng._inflight == {}
    again = await eng.route(request("c2 gone"))  # the same prompt later is embedded afresh
    assert again.cluster_id == 2 and embedder.texts_embedded == 2
    await eng.close()


async def test_prompts_differing_only_in_surrounding_whitespace_share_the_cache_and_a_job() -> None:
    """The embedder embeds the stripped prompt (as sentence-transformers does), so these are one prompt: the cache
    and singleflight keyed the raw text, and embedded each again."""
    embedder = FakeEmbedder(delay_s=0.05)
    eng, metrics = make_engine(embedder)
    together = await asyncio.gather(eng.route(request("c5 same")), eng.route(request("  c5 same\n")))
    assert [d.cluster_id for d in together] == [5, 5] and embedder.texts_embedded == 1
    assert metrics.singleflight_joins._value.get() == 1
    later = await eng.route(request("\tc5 same "))
    assert later.cache_hit and embedder.texts_embedded == 1
    assert not (await eng.route(request("c5  same"))).cache_hit  # inner whitespace is the prompt's own
    await eng.close()


async def test_a_job_its_clients_left_gives_its_queue_slot_to_a_client_still_here() -> None:
    """A full queue counted jobs no one waited for any more (dropped only when a worker reached them): a live client
    got 429 while the queue held a departed one's prompt."""
    embedder = FakeEmbedder(delay_s=0.3)
    eng, metrics = make_engine(embedder, max_queue=2)
    busy = asyncio.ensure_future(eng.route(request("c1 busy")))
    await asyncio.sleep(0.05)  # computing: the one worker is busy
    gone = asyncio.ensure_future(eng.route(request("c2 gone")))
    await asyncio.sleep(0.02)
    gone.cancel()
    await asyncio.sleep(0.02)
    assert eng.admitted == 2  # the departed prompt still holds a slot until someone needs it
    served = await eng.route(request("c3 new"))
    assert served.cluster_id == 3 and metrics.dropped._value.get() == 1
    await busy
    assert embedder.texts_embedded == 2 and eng.admitted == 0
    with pytest.raises(asyncio.CancelledError):
        await gone
    await eng.close()


async def test_a_job_whose_client_left_while_it_was_tokenized_gives_its_slot_back_at_once() -> None:
    """A full queue's sweep cannot see a job the tokenizer holds, and clears its hint: that job then sat in the ready
    queue holding its slot until a worker reached it, and live clients got 429 meanwhile."""

    class SlowTokenizer(FakeEmbedder):
        def tokenize(self, texts: Sequence[str]) -> list[list[int]]:
            time.sleep(0.2)
            return super().tokenize(texts)

    eng, metrics = make_engine(SlowTokenizer(delay_s=0.8), max_queue=2)
    busy = asyncio.ensure_future(eng.route(request("c1 busy")))
    await asyncio.sleep(0.3)  # tokenized, computing for 0.8 s
    gone = asyncio.ensure_future(eng.route(request("c2 gone")))
    await asyncio.sleep(0.05)  # in the tokenizer
    gone.cancel()
    with pytest.raises(Overloaded):  # full: c1 computing, c2 being tokenized (its slot not yet free)
        await eng.route(request("c3 refused"))
    await asyncio.sleep(0.25)  # c2's tokenization is over: dropped then, not when a worker reaches it
    assert eng.admitted == 1 and metrics.dropped._value.get() == 1
    served = await eng.route(request("c4 served"))
    assert served.cluster_id == 4
    await busy
    await eng.close()


async def test_a_client_joining_a_computing_job_reports_its_own_queue_and_embedding_time() -> None:
    """A follower reported the leader's queue wait and the whole forward pass, time it never spent."""
    computing = threading.Event()

    class Signalling(FakeEmbedder):
        def embed_ids(self, sequences: Sequence[Sequence[int]], *, cpu_threads: int | None = None) -> np.ndarray:
            computing.set()
            return super().embed_ids(sequences, cpu_threads=cpu_threads)

    eng, _ = make_engine(Signalling(delay_s=0.4))
    leader = asyncio.ensure_future(eng.route(request("c4 shared")))
    assert await asyncio.to_thread(computing.wait, 5.0)
    await asyncio.sleep(0.15)  # well into the 400 ms forward pass
    follower = await eng.route(request("c4 shared"))
    first = await leader
    assert follower.queue_ms == 0.0  # it joined after the batch had started
    assert follower.embedding_ms <= first.embedding_ms - 100  # it joined at least 150 ms into the pass
    await eng.close()


async def test_many_concurrent_prompts_are_batched() -> None:
    embedder = FakeEmbedder(delay_s=0.01)
    eng, _ = make_engine(embedder)
    decisions = await asyncio.gather(*(eng.route(request(f"c{i % DIM} prompt {i}")) for i in range(200)))
    assert [d.cluster_id for d in decisions] == [i % DIM for i in range(200)]
    assert max(embedder.batches) > 1
    assert sum(embedder.batches) == 200
    await eng.close()


class CountingIndex:
    """A centroid index that records the number of queries of each ``search`` call."""

    def __init__(self, inner: CentroidSearch) -> None:
        self.inner = inner
        self.backend, self.num_centroids, self.dim = inner.backend, inner.num_centroids, inner.dim
        self.calls: list[int] = []

    def search(self, queries: np.ndarray, k: int = 1) -> Nearest:
        self.calls.append(len(queries))
        return self.inner.search(queries, k)


async def test_the_index_is_searched_once_per_batch_not_once_per_prompt() -> None:
    embedder = FakeEmbedder(delay_s=0.01)
    eng, _ = make_engine(embedder)
    state = eng._holder.current()
    assert state is not None
    index = CountingIndex(state.index)
    eng.install(dataclasses.replace(state, index=index))
    decisions = await asyncio.gather(*(eng.route(request(f"c{i % DIM} batched {i}")) for i in range(200)))
    assert [d.cluster_id for d in decisions] == [i % DIM for i in range(200)]
    assert max(embedder.batches) > 1
    assert index.calls == embedder.batches  # one search of the whole batch per forward pass
    await eng.close()


async def test_queue_limit_answers_overloaded() -> None:
    embedder = FakeEmbedder(delay_s=0.05)
    eng, metrics = make_engine(embedder, max_queue=4)
    results = await asyncio.gather(*(eng.route(request(f"p{i}")) for i in range(10)), return_exceptions=True)
    overloaded = [r for r in results if isinstance(r, Overloaded)]
    assert len(overloaded) == 6
    assert all(not isinstance(r, Exception) for r in results[:4])
    assert metrics.cache_misses._value.get() == 4  # the refused ones computed nothing (120 read 58 computed)
    await eng.close()


async def test_not_ready_without_weights() -> None:
    settings = RouterSettings.from_env({}, compute_threads=1)
    eng = RouterEngine(embedder=FakeEmbedder(), holder=StateHolder(), settings=settings, metrics=RouterMetrics())
    with pytest.raises(NotReady):
        await eng.route(request("x"))
    await eng.close()


async def test_reload_swaps_weights_and_clears_cache(
    engine: tuple[RouterEngine, FakeEmbedder, RouterMetrics], tmp_path: Path
) -> None:
    eng, embedder, _ = engine
    before = await eng.route(request("c3 reload", cost_weight=0.0))
    path = tmp_path / "new.safetensors"
    new = toy_weights(bump=0.05)
    save_weights(new, path)
    loaded = await eng.reload(path)
    assert loaded.version == new.version != before.weights_version
    after = await eng.route(request("c3 reload", cost_weight=0.0))
    assert after.cache_hit is False  # cache cleared
    assert after.weights_version == new.version
    assert after.expected_error == pytest.approx(0.15)
    assert embedder.texts_embedded == 2


async def test_bad_reload_keeps_the_old_weights(
    engine: tuple[RouterEngine, FakeEmbedder, RouterMetrics], tmp_path: Path
) -> None:
    eng, _, metrics = engine
    before = await eng.route(request("c3 keep"))
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"not a weights file")
    with pytest.raises(WeightsError):
        await eng.reload(garbage)
    other_embedder = tmp_path / "other.safetensors"
    save_weights(toy_weights(sha="0" * 64), other_embedder)
    with pytest.raises(WeightsError, match="running embedder"):
        await eng.reload(other_embedder)
    with pytest.raises(WeightsError):
        await eng.reload(tmp_path / "missing.safetensors")
    after = await eng.route(request("c3 keep"))
    assert after.weights_version == before.weights_version
    assert after.cache_hit is True  # a rejected file does not clear the cache
    assert metrics.reloads.labels(result="rejected")._value.get() == 3


async def test_batch_computed_under_old_weights_is_rescored_with_the_request_snapshot() -> None:
    embedder = FakeEmbedder(delay_s=0.1)
    eng, _ = make_engine(embedder)
    pending = asyncio.ensure_future(eng.route(request("c3 racing", cost_weight=0.0)))
    await asyncio.sleep(0.03)  # the batch is computing with the first weights
    eng.install(RouterState.build(toy_weights(bump=0.2)))
    decision = await pending
    assert decision.expected_error == pytest.approx(0.1)  # the request's own snapshot, consistently
    await eng.close()


def test_build_state_checks_the_embedder(tmp_path: Path) -> None:
    path = tmp_path / "w.safetensors"
    save_weights(toy_weights(), path)
    assert build_state(path, FakeEmbedder()).weights.num_clusters == DIM


def test_cpu_workers_follow_the_cores_this_process_may_use(monkeypatch: pytest.MonkeyPatch) -> None:
    """Under taskset or a container's cpuset, os.cpu_count() still names the host's cores."""
    from service.config import RouterSettings
    from service.router.engine import compute_workers

    monkeypatch.setattr("os.sched_getaffinity", lambda _pid: {3})
    monkeypatch.setattr("os.cpu_count", lambda: 64)
    assert compute_workers(RouterSettings.from_env({}), "cpu") == 1
    assert compute_workers(RouterSettings.from_env({}, compute_threads=3), "cpu") == 3

"""The CUDA path on a GPU: fused kernels against their torch references, graphs against eager mode,
concurrent callers, the torch index. Skipped without CUDA (CPU parity: test_embedder_parity.py)."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import numpy as np
import pytest
import torch

from service.router import pooling
from service.router.embedder import CudaOptions, MiniLMEmbedder
from service.router.index import build_index
from service.router.kernels import RouterKernels, load_kernels
from service.router.weights import default_weights_path, load_weights
from tests.unit.test_embedder_parity import PROMPTS

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

FP16_ATOL = 2e-3  # one embedding, graphs vs eager: the same kernels, so far tighter in practice
MIN_COSINE = 0.9999
BF16_MIN_COSINE = 0.999  # bf16 keeps 8 mantissa bits: looser than fp16 against the fp32 reference
# Small buckets so that a test batch crosses several of them, and eager fallbacks on both axes.
SMALL = CudaOptions(graph_batch_sizes="1,4,8", graph_seq_lens="16,32,64", max_batch_size=16)


@pytest.fixture(scope="module")
def kernels() -> RouterKernels:
    found = load_kernels()
    if found is None:
        pytest.skip("router_kernels.so not built (cmake -S . -B build && cmake --build build)")
    return found


@pytest.fixture(scope="module")
def eager() -> Iterator[MiniLMEmbedder]:
    yield MiniLMEmbedder(device="cuda", cuda=CudaOptions(graphs=False, kernels=False, max_batch_size=16))


def texts(n: int) -> list[str]:
    return [PROMPTS[i % len(PROMPTS)] + f" variant {i}" * (i % 5) for i in range(n)]


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.asarray((a * b).sum(axis=1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_pooling_kernel_matches_torch(kernels: RouterKernels, dtype: torch.dtype) -> None:
    gen = torch.Generator(device="cuda").manual_seed(7)
    hidden = torch.randn(37, 48, 384, device="cuda", generator=gen).to(dtype)
    lengths = torch.randint(1, 49, (37,), device="cuda", generator=gen)
    mask = torch.arange(48, device="cuda")[None, :] < lengths[:, None]
    got = kernels.mean_pool_l2norm(hidden, mask)
    ref = pooling.mean_pool_l2norm(hidden.double(), mask).float()
    assert got.dtype == torch.float32 and torch.isfinite(got).all()
    assert ((got - ref).norm() / ref.norm()).item() < 1e-5


@pytest.mark.parametrize(("batch", "seq", "dim"), [(1, 5, 384), (3, 7, 100), (2, 130, 257)])
def test_pooling_kernel_edge_shapes(kernels: RouterKernels, batch: int, seq: int, dim: int) -> None:
    """One row, a width that is no multiple of the block (the ``d < dim`` tail), and a row with no token at all (both
    give zeros: the torch reference divides by a count clamped to 1, then normalises a zero vector)."""
    gen = torch.Generator(device="cuda").manual_seed(9)
    hidden = torch.randn(batch, seq, dim, device="cuda", generator=gen).half()
    mask = torch.ones(batch, seq, dtype=torch.bool, device="cuda")
    if batch > 1:
        mask[1] = False  # an empty row
        mask[0, seq // 2 :] = False
    got = kernels.mean_pool_l2norm(hidden, mask)
    ref = pooling.mean_pool_l2norm(hidden.double(), mask).float()
    assert got.shape == (batch, dim) and torch.isfinite(got).all()
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    if batch > 1:
        assert torch.count_nonzero(got[1]) == 0


def test_centroid_kernel_matches_torch(kernels: RouterKernels) -> None:
    gen = torch.Generator(device="cuda").manual_seed(8)
    queries = torch.nn.functional.normalize(torch.randn(513, 384, device="cuda", generator=gen), dim=1)
    centroids = torch.nn.functional.normalize(torch.randn(100, 384, device="cuda", generator=gen), dim=1)
    scores, ids = kernels.centroid_topk(queries, centroids, 3)
    exact = queries.double() @ centroids.double().T  # an fp64 reference (pooling.centroid_topk works in fp32)
    ref_scores, ref_ids = torch.topk(exact, 3, dim=1)
    torch.testing.assert_close(scores.double(), ref_scores, atol=1e-5, rtol=0)
    # the chosen ids carry the scores reported for them (ties within rounding may swap ids)
    torch.testing.assert_close(exact.gather(1, ids), ref_scores, atol=1e-5, rtol=0)
    assert (ids == ref_ids).float().mean().item() > 0.99


def test_kernels_run_inside_a_cuda_graph(kernels: RouterKernels) -> None:
    hidden = torch.randn(8, 32, 384, device="cuda", dtype=torch.float16)
    mask = torch.ones(8, 32, dtype=torch.bool, device="cuda")
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        kernels.mean_pool_l2norm(hidden, mask)  # warm-up outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=stream):
        out = kernels.mean_pool_l2norm(hidden, mask)
    hidden.copy_(torch.randn_like(hidden))
    mask[:, 20:] = False
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(out, pooling.mean_pool_l2norm(hidden, mask), atol=1e-4, rtol=1e-3)


def test_graphs_match_eager_across_buckets_and_fallbacks(eager: MiniLMEmbedder) -> None:
    graphed = MiniLMEmbedder(device="cuda", cuda=SMALL)
    assert graphed.runtime_info()["cuda_graphs"] == 9
    batch = texts(23)  # > the largest batch bucket, lengths past the largest sequence bucket
    got, ref = graphed.embed(batch, batch_size=16), eager.embed(batch, batch_size=16)
    np.testing.assert_allclose(got, ref, atol=FP16_ATOL)
    assert cosine(got, ref).min() >= MIN_COSINE


def test_the_chosen_attention_backend_matches_the_math_one(eager: MiniLMEmbedder) -> None:
    """The other tests compare CUDA paths with each other, so an attention backend wrong on this GPU would pass them
    all alike: torch picks cuDNN attention on Hopper with a recent cuDNN, here with a broadcast padding mask and
    inside graphs. Both paths against SDPA's plain math backend."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    batch = texts(23)
    graphed = MiniLMEmbedder(device="cuda", cuda=SMALL)
    with sdpa_kernel(SDPBackend.MATH):
        ref = eager.embed(batch, batch_size=16)
    for got in (eager.embed(batch, batch_size=16), graphed.embed(batch, batch_size=16)):
        assert cosine(got, ref).min() >= MIN_COSINE


def test_a_bucket_whose_capture_fails_runs_eagerly(eager: MiniLMEmbedder, monkeypatch: pytest.MonkeyPatch) -> None:
    real_graph = torch.cuda.graph
    calls = 0

    def flaky_graph(*args: object, **kwargs: object) -> object:
        nonlocal calls
        calls += 1
        if calls == 2:  # the second bucket's capture fails, as an uncapturable attention backend would
            raise RuntimeError("operation not permitted when stream is capturing")
        return real_graph(*args, **kwargs)

    monkeypatch.setattr(torch.cuda, "graph", flaky_graph)
    graphed = MiniLMEmbedder(device="cuda", cuda=SMALL)
    assert graphed.runtime_info()["cuda_graphs"] == 8  # of 9: the failed one runs eagerly, the server still starts
    batch = texts(23)
    got, ref = graphed.embed(batch, batch_size=16), eager.embed(batch, batch_size=16)
    np.testing.assert_allclose(got, ref, atol=FP16_ATOL)


def test_fused_kernels_match_torch_pooling_end_to_end(eager: MiniLMEmbedder, kernels: RouterKernels) -> None:
    fused = MiniLMEmbedder(device="cuda", cuda=CudaOptions(graphs=False, max_batch_size=16))
    assert fused.runtime_info()["fused_kernels"]
    batch = texts(19)
    np.testing.assert_allclose(fused.embed(batch, batch_size=16), eager.embed(batch, batch_size=16), atol=1e-5)


def test_concurrent_callers_get_their_own_results() -> None:
    embedder = MiniLMEmbedder(device="cuda", cuda=SMALL)
    batches = [embedder.tokenize(texts(n)) for n in (3, 7, 12, 16)]
    serial = [embedder.embed_ids(ids) for ids in batches]
    results: dict[int, list[np.ndarray]] = {}

    def worker(slot: int) -> None:
        results[slot] = [embedder.embed_ids(ids) for ids in batches * 5]

    threads = [threading.Thread(target=worker, args=(slot,)) for slot in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for runs in results.values():
        for i, got in enumerate(runs):
            np.testing.assert_array_equal(got, serial[i % len(batches)])


def test_bfloat16_stays_close_to_float16(eager: MiniLMEmbedder) -> None:
    bf16 = MiniLMEmbedder(device="cuda", dtype="bfloat16", cuda=SMALL)
    batch = texts(11)
    assert cosine(bf16.embed(batch), eager.embed(batch)).min() >= BF16_MIN_COSINE


def test_torch_index_on_cuda_matches_the_cpu_index(kernels: RouterKernels) -> None:
    centroids = load_weights(default_weights_path()).centroids
    rng = np.random.default_rng(5)
    queries = rng.normal(size=(300, centroids.shape[1])).astype(np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    on_gpu = build_index(centroids, backend="torch", device="cuda", kernels=kernels)
    assert on_gpu.backend == "torch-cuda"
    found, ref = on_gpu.search(queries, 3), build_index(centroids, backend="torch").search(queries, 3)
    np.testing.assert_array_equal(found.ids[:, 0], ref.ids[:, 0])
    np.testing.assert_allclose(found.similarity, ref.similarity, atol=1e-5)

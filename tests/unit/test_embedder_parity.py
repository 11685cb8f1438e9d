"""Our packed MiniLM against sentence-transformers' own encode (fp32, CPU): the reference."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
import torch

from service.digest import file_sha256
from service.router.embedder import MiniLMEmbedder
from service.router.index import CentroidIndex, build_index
from service.router.model_card import default_model_dir
from service.router.weights import default_weights_path, load_weights

OFFICIAL_SHA256 = "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"
MIN_COSINE = 0.9999

PROMPTS = [
    "hi",
    "Prove the square root of 2 is irrational.",
    "Classify this ticket: billing | technical | other",
    "What is the capital of Australia?",
    # long, past the 256-token truncation
    "The history of the Roman Empire spans many centuries and includes " * 40,
    " ".join(f"token{i}" for i in range(600)),
    # unicode
    "日本語のテキストと絵文字 🎉🚀, café, naïve, Straße, Ελληνικά, русский текст, عربى",
    "\uff26\uff55\uff4c\uff4c\uff57\uff49\uff44\uff54\uff48 fullwidth, combining e\u0301, zero\u200bwidth",
    # code
    "def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\n\nprint([fib(i) for i in range(10)])",
    "SELECT u.id, COUNT(*) FROM users u JOIN orders o ON o.user_id = u.id GROUP BY u.id HAVING COUNT(*) > 3;",
    '{"json": [1, 2, {"nested": true}], "key": null}',
    # whitespace-heavy
    "   leading and trailing   \n\n\t\t  ",
    "many\n\n\n\nblank\n\n\n\nlines\t\ttabs     spaces",
    " \u00a0 non-breaking \u3000 ideographic space ",
    # a few-shot style block
    "Question: Which gas do plants absorb?\nA. Oxygen\nB. Carbon dioxide\nC. Nitrogen\nD. Helium\nAnswer:",
]


@pytest.fixture(scope="module")
def ours() -> Iterator[MiniLMEmbedder]:
    yield MiniLMEmbedder(device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def reference() -> np.ndarray:
    from sentence_transformers import SentenceTransformer

    # fp32 whatever the folder holds (the GPU run points the model package at an fp16 export)
    model = SentenceTransformer(str(default_model_dir()), device="cpu").float()
    return model.encode(PROMPTS, batch_size=4, convert_to_numpy=True, normalize_embeddings=False)


def test_model_file_is_the_official_one(ours: MiniLMEmbedder) -> None:
    assert ours.model_sha256 == OFFICIAL_SHA256
    assert file_sha256(default_model_dir() / "model.safetensors") == OFFICIAL_SHA256


def test_truncates_at_256_tokens_like_sentence_transformers(ours: MiniLMEmbedder) -> None:
    ids = ours.tokenize([PROMPTS[4], "hi"])
    assert len(ids[0]) == 256
    assert ids[1] == [101, 7632, 102]  # [CLS] hi [SEP]


def test_token_ids_are_sentence_transformers_own(ours: MiniLMEmbedder) -> None:
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(default_model_dir()), device="cpu")
    features = model.tokenize(PROMPTS)  # padded to the longest, with its attention mask
    expected = [
        row[mask.bool()].tolist() for row, mask in zip(features["input_ids"], features["attention_mask"], strict=True)
    ]
    assert ours.tokenize(PROMPTS) == expected


def test_cosine_parity_and_same_cluster(ours: MiniLMEmbedder, reference: np.ndarray) -> None:
    got = ours.embed(PROMPTS, batch_size=7)  # batches mix lengths: exercises packing
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, rtol=1e-5)
    ref = reference / np.linalg.norm(reference, axis=1, keepdims=True)
    cosine = (got * ref).sum(axis=1)
    assert cosine.min() >= MIN_COSINE, dict(zip(PROMPTS, cosine, strict=True))
    index = CentroidIndex(load_weights(default_weights_path()).centroids)
    np.testing.assert_array_equal(index.search(got).ids[:, 0], index.search(ref).ids[:, 0])


def test_batch_composition_does_not_change_results(ours: MiniLMEmbedder) -> None:
    one_by_one = np.stack([ours.embed([p])[0] for p in PROMPTS])
    together = ours.embed(PROMPTS, batch_size=len(PROMPTS))
    np.testing.assert_allclose(together, one_by_one, atol=2e-5)


def test_torchscript_is_used_and_matches_eager(ours: MiniLMEmbedder) -> None:
    assert ours.scripted
    eager = MiniLMEmbedder(device="cpu", dtype="float32", torchscript=False)
    assert not eager.scripted
    np.testing.assert_allclose(ours.embed(PROMPTS, batch_size=5), eager.embed(PROMPTS, batch_size=5), atol=1e-6)


def test_onednn_linear_is_used_on_cpu_and_matches_torch_kernels(ours: MiniLMEmbedder) -> None:
    # torch's CPU wheels are built with oneDNN, so the default CPU encoder runs its prepacked GEMMs
    assert torch.backends.mkldnn.is_available()
    assert ours.onednn and ours.runtime_info()["onednn_linear"] is True
    plain = MiniLMEmbedder(device="cpu", dtype="float32", onednn=False)
    assert plain.scripted and not plain.onednn and plain.runtime_info()["onednn_linear"] is False
    got, expected = ours.embed(PROMPTS, batch_size=5), plain.embed(PROMPTS, batch_size=5)
    np.testing.assert_allclose(got, expected, atol=2e-5)
    assert (got * expected).sum(axis=1).min() >= 0.99999


def test_a_failed_prepack_keeps_torch_kernels_and_says_so(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, ours: MiniLMEmbedder
) -> None:
    from service.router import embedder

    def fail(model: object) -> object:
        raise RuntimeError("simulated oneDNN failure")

    monkeypatch.setattr(embedder, "prepack_for_onednn", fail)
    with caplog.at_level("WARNING", logger=embedder.__name__):
        fallback = MiniLMEmbedder(device="cpu", dtype="float32")
    assert not fallback.onednn and fallback.scripted
    assert "oneDNN prepacking failed" in caplog.text
    np.testing.assert_allclose(fallback.embed(PROMPTS[:4]), ours.embed(PROMPTS[:4]), atol=2e-5)


@pytest.mark.skipif(not torch.ops.mkldnn._is_mkldnn_bf16_supported(), reason="oneDNN runs no bf16 GEMM on this CPU")
def test_cpu_bf16_prepacks_and_routes_like_fp32(reference: np.ndarray) -> None:
    bf16 = MiniLMEmbedder(device="cpu", dtype="bfloat16")
    assert bf16.runtime_info() == {"dtype": "bfloat16", "torchscript": True, "onednn_linear": True}
    got = bf16.embed(PROMPTS, batch_size=7)
    assert got.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, rtol=1e-5)
    ref = reference / np.linalg.norm(reference, axis=1, keepdims=True)
    cosine = (got * ref).sum(axis=1)
    # 8 mantissa bits: close, not the fp32 parity (0.99992 at worst against fp32 on RouterBench's 2,225 prompts)
    assert cosine.min() >= 0.999, cosine
    assert np.abs(got - ref).max() > 1e-4  # it really ran in bf16
    index = CentroidIndex(load_weights(default_weights_path()).centroids)
    np.testing.assert_array_equal(index.search(got).ids[:, 0], index.search(ref).ids[:, 0])


def test_bf16_without_bf16_instructions_says_it_will_be_slow(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from service.router import embedder

    monkeypatch.setattr(embedder, "native_bf16", lambda: False)
    with caplog.at_level("WARNING", logger=embedder.__name__):
        slow = MiniLMEmbedder(device="cpu", dtype="bfloat16")
    assert "expect it slower than float32" in caplog.text
    assert slow.embed(PROMPTS[:2]).shape == (2, 384)


@pytest.mark.parametrize(("fast_bf16", "expected"), [(True, torch.bfloat16), (False, torch.float32)])
def test_auto_dtype_on_cpu_is_bf16_where_it_is_the_faster(
    monkeypatch: pytest.MonkeyPatch, fast_bf16: bool, expected: torch.dtype
) -> None:
    from service.router import embedder

    monkeypatch.setattr(embedder, "fast_cpu_bf16", lambda: fast_bf16)
    assert embedder.resolve_dtype("auto", torch.device("cpu")) == expected
    assert embedder.resolve_dtype("auto", torch.device("cuda")) == torch.float16
    assert embedder.resolve_dtype("float32", torch.device("cpu")) == torch.float32  # asked for: never changed


@pytest.mark.parametrize(
    ("native", "onednn_ok", "expected", "probes"),
    [(True, True, True, 1), (True, False, False, 1), (False, True, False, 0)],  # no probe without the instructions
)
def test_bf16_is_the_faster_only_with_bf16_instructions_and_a_onednn_bf16_gemm(
    monkeypatch: pytest.MonkeyPatch, native: bool, onednn_ok: bool, expected: bool, probes: int
) -> None:
    from service.router import embedder

    probed: list[torch.dtype] = []

    def onednn(dtype: torch.dtype) -> bool:
        probed.append(dtype)
        return onednn_ok

    monkeypatch.setattr(embedder, "onednn_available", onednn)
    monkeypatch.setattr(embedder, "native_bf16", lambda: native)
    assert embedder.fast_cpu_bf16() is expected
    assert probed == [torch.bfloat16] * probes


def test_empty_batch(ours: MiniLMEmbedder) -> None:
    assert ours.embed_ids([]).shape == (0, 384)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_half_precision_parity(reference: np.ndarray) -> None:
    gpu = MiniLMEmbedder(device="cuda")  # fp16 by default on CUDA
    got = gpu.embed(PROMPTS, batch_size=7)
    ref = reference / np.linalg.norm(reference, axis=1, keepdims=True)
    assert (got * ref).sum(axis=1).min() >= MIN_COSINE
    # FAISS where installed, else the exact torch index (the GPU benchmark machine has no FAISS)
    index = build_index(load_weights(default_weights_path()).centroids)
    np.testing.assert_array_equal(index.search(got).ids[:, 0], index.search(ref).ids[:, 0])

"""The torch centroid index (hosts without FAISS) against FAISS, and how ``build_index`` picks."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from service.router import index as index_module
from service.router.index import build_index
from service.router.torch_index import HOST_SEARCH_MAX_ROWS, TorchCentroidIndex


def unit_rows(rng: np.random.Generator, n: int, dim: int = 384) -> np.ndarray:
    v = rng.normal(size=(n, dim)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def test_torch_index_matches_faiss() -> None:
    rng = np.random.default_rng(3)
    centroids, queries = unit_rows(rng, 100), unit_rows(rng, 65)
    faiss_found = build_index(centroids, backend="faiss").search(queries, k=3)
    torch_found = TorchCentroidIndex(centroids).search(queries, k=3)
    np.testing.assert_array_equal(torch_found.ids, faiss_found.ids)
    np.testing.assert_allclose(torch_found.similarity, faiss_found.similarity, atol=1e-5)
    assert torch_found.ids.dtype == np.int64 and torch_found.ids.shape == (65, 3)
    assert TorchCentroidIndex(np.eye(4, dtype=np.float32)).search(np.eye(4, dtype=np.float32)[:1], k=10).ids.shape == (
        1,
        4,
    )


def test_a_few_queries_are_searched_on_the_host_whatever_the_device() -> None:
    """A request's own embedding is searched on the event loop: on a GPU, a device search would copy it over and wait
    behind the running batches. On the meta device (no data) any device search would fail to copy its result back."""
    rng = np.random.default_rng(4)
    centroids, queries = unit_rows(rng, 100), unit_rows(rng, HOST_SEARCH_MAX_ROWS)
    on_device = TorchCentroidIndex(centroids, device="meta")
    expected = build_index(centroids, backend="faiss").search(queries, k=2)
    found = on_device.search(queries, k=2)
    np.testing.assert_array_equal(found.ids, expected.ids)
    np.testing.assert_allclose(found.similarity, expected.similarity, atol=1e-5)
    with pytest.raises(NotImplementedError):  # a batch still goes to the device
        on_device.search(unit_rows(rng, HOST_SEARCH_MAX_ROWS + 1), k=2)


def test_backend_choice_and_the_loud_fallback(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    centroids = np.eye(4, dtype=np.float32)
    assert build_index(centroids).backend == "faiss-cpu"  # faiss-cpu is installed here
    assert build_index(centroids, backend="torch").backend == "torch-cpu"
    with pytest.raises(ValueError, match="index backend"):
        build_index(centroids, backend="annoy")
    monkeypatch.setattr(index_module, "faiss", None)
    with caplog.at_level(logging.WARNING, logger="service.router.index"):
        assert build_index(centroids).backend == "torch-cpu"
    assert "FAISS is missing" in caplog.text
    with pytest.raises(ImportError, match="FAISS is missing"):
        build_index(centroids, backend="faiss")

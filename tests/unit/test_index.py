from __future__ import annotations

import numpy as np

from service.router.index import CentroidIndex


def test_search_matches_brute_force_for_a_batch() -> None:
    rng = np.random.default_rng(1)
    centroids = rng.normal(size=(100, 384)).astype(np.float32)
    centroids /= np.linalg.norm(centroids, axis=1, keepdims=True)
    queries = rng.normal(size=(33, 384)).astype(np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    index = CentroidIndex(centroids)
    found = index.search(queries, k=3)
    sims = queries @ centroids.T
    expected = np.argsort(-sims, axis=1)[:, :3]
    np.testing.assert_array_equal(found.ids, expected)
    np.testing.assert_allclose(found.similarity, np.take_along_axis(sims, expected, axis=1), rtol=1e-5, atol=1e-5)
    assert found.ids.shape == (33, 3)
    assert not index.on_gpu  # faiss-cpu in CI


def test_k_is_capped_by_the_number_of_centroids() -> None:
    index = CentroidIndex(np.eye(4, dtype=np.float32))
    found = index.search(np.eye(4, dtype=np.float32)[:1], k=10)
    assert found.ids.shape == (1, 4)
    assert found.ids[0, 0] == 0

"""Nearest centroid by inner product (= cosine: centroids and queries are unit vectors), with FAISS.

A GPU index where faiss-gpu and CUDA are present, the CPU flat index otherwise. ``search`` takes a
whole batch of queries: the batcher calls it once per batch, not once per request.
FAISS releases the GIL during the search, so it is safe to call from the batcher's worker threads.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

try:
    import faiss
except ImportError as exc:  # pragma: no cover - depends on the install
    raise ImportError(
        "FAISS is missing: pip install 'llm-routing-service[cpu]' (or '[faiss-gpu]' on CUDA hosts)"
    ) from exc

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Nearest:
    """``ids`` [B, k] nearest centroids, best first; ``similarity`` [B, k] their cosine similarity."""

    ids: np.ndarray
    similarity: np.ndarray


class CentroidIndex:
    def __init__(self, centroids: np.ndarray, *, use_gpu: bool = True) -> None:
        vectors = np.ascontiguousarray(centroids, dtype=np.float32)
        self.num_centroids, self.dim = vectors.shape
        cpu_index = faiss.IndexFlatIP(self.dim)
        cpu_index.add(vectors)
        self.on_gpu = False
        self._index: faiss.Index = cpu_index
        if use_gpu and _faiss_has_gpu():
            self._gpu_resources = faiss.StandardGpuResources()
            self._index = faiss.index_cpu_to_gpu(self._gpu_resources, 0, cpu_index)
            self.on_gpu = True
        logger.debug("centroid index: %d x %d on %s", self.num_centroids, self.dim, "gpu" if self.on_gpu else "cpu")

    def search(self, queries: np.ndarray, k: int = 1) -> Nearest:
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        similarity, ids = self._index.search(queries, min(k, self.num_centroids))
        return Nearest(ids=ids.astype(np.int64, copy=False), similarity=similarity)


def _faiss_has_gpu() -> bool:
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0

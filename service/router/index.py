"""Nearest centroid by inner product (= cosine: centroids and queries are unit vectors).

Two exact backends behind one ``search``: FAISS (a GPU index where faiss-gpu and CUDA are present, the
CPU flat index otherwise), and ``TorchCentroidIndex`` (``torch_index.py``: one product and a top-k on
the embedder's device) for hosts without FAISS. ``build_index`` picks one. ``search`` takes a whole
batch of queries: the batcher calls it once per batch, not once per request. Both release the GIL
while they compute, so they are safe to call from the batcher's worker threads.
"""

from __future__ import annotations

import logging
import types
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol

import numpy as np

from service.config import INDEX_BACKENDS

faiss: types.ModuleType | None
try:
    import faiss
except ImportError:  # pragma: no cover - depends on the install; build_index falls back to torch
    faiss = None

if TYPE_CHECKING:
    from service.router.kernels import RouterKernels

logger = logging.getLogger(__name__)

FAISS_MISSING = "FAISS is missing: pip install 'llm-routing-service[cpu]' (or '[faiss-gpu]' on CUDA hosts)"


class Nearest(NamedTuple):  # one per search: cheaper to make than a frozen dataclass (0.35 against 0.49 us)
    """``ids`` [B, k] nearest centroids, best first; ``similarity`` [B, k] their cosine similarity."""

    ids: np.ndarray
    similarity: np.ndarray


class CentroidSearch(Protocol):
    backend: str  # faiss-cpu, faiss-gpu, torch-cpu, torch-cuda
    num_centroids: int
    dim: int

    def search(self, queries: np.ndarray, k: int = 1) -> Nearest: ...


class CentroidIndex:
    """FAISS's exact inner-product index."""

    def __init__(self, centroids: np.ndarray, *, use_gpu: bool = True) -> None:
        if faiss is None:
            raise ImportError(FAISS_MISSING)
        vectors = np.ascontiguousarray(centroids, dtype=np.float32)
        self.num_centroids, self.dim = vectors.shape
        cpu_index = faiss.IndexFlatIP(self.dim)
        cpu_index.add(vectors)
        self.on_gpu = False
        self._index: Any = cpu_index  # a faiss.Index (faiss ships no stubs)
        if use_gpu and _faiss_has_gpu():
            self._gpu_resources = faiss.StandardGpuResources()
            self._index = faiss.index_cpu_to_gpu(self._gpu_resources, 0, cpu_index)
            self.on_gpu = True
        self.backend = "faiss-gpu" if self.on_gpu else "faiss-cpu"
        logger.debug("centroid index: %d x %d on %s", self.num_centroids, self.dim, "gpu" if self.on_gpu else "cpu")

    def search(self, queries: np.ndarray, k: int = 1) -> Nearest:
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        similarity, ids = self._index.search(queries, min(k, self.num_centroids))
        return Nearest(ids=ids.astype(np.int64, copy=False), similarity=similarity)


def _faiss_has_gpu() -> bool:
    return faiss is not None and hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


def build_index(
    centroids: np.ndarray,
    *,
    backend: str = "auto",
    device: str = "cpu",
    kernels: RouterKernels | None = None,
) -> CentroidSearch:
    """``auto``: FAISS when it imports, else the torch index on ``device``, with a warning (an install
    without FAISS is a deployment choice to see, not to hide: /health reports the backend too)."""
    if backend not in INDEX_BACKENDS:
        raise ValueError(f"index backend must be one of {', '.join(INDEX_BACKENDS)}; got {backend!r}")
    if backend == "faiss" or (backend == "auto" and faiss is not None):
        return CentroidIndex(centroids)
    from service.router.torch_index import TorchCentroidIndex

    if backend == "auto":
        logger.warning("%s; centroid search falls back to the exact torch index on %s", FAISS_MISSING, device)
    return TorchCentroidIndex(centroids, device=device, kernels=kernels)

"""The exact centroid search in torch: one [B, H] x [H, K] product and a top-k on the embedder's device.

For hosts without FAISS (the GPU benchmark machine has none). Exact like FAISS's flat index; only
the order of exactly tied scores may differ. On CUDA it uses the fused kernel of ``kernels/`` when
given one, for batches: a few queries (a request's own ``embedding``, searched on the event loop) are searched
on the host, since a device search would copy them over, wait behind the batches the GPU is running, and block
the loop meanwhile.
"""

from __future__ import annotations

import numpy as np
import torch

from service.router import pooling
from service.router.index import Nearest
from service.router.kernels import RouterKernels

# Up to this many queries the search runs on the host (100 x 384 per query: microseconds), never on the device.
HOST_SEARCH_MAX_ROWS = 16


class TorchCentroidIndex:
    def __init__(self, centroids: np.ndarray, *, device: str = "cpu", kernels: RouterKernels | None = None) -> None:
        self._device = torch.device(device)
        host = torch.from_numpy(np.array(centroids, dtype=np.float32, order="C"))
        self._host_centroids = host
        self._centroids = host if self._device.type == "cpu" else host.to(self._device)
        self.num_centroids, self.dim = self._centroids.shape
        self.backend = f"torch-{self._device.type}"
        self._kernels = kernels if self._device.type == "cuda" else None

    def search(self, queries: np.ndarray, k: int = 1) -> Nearest:
        k = min(k, self.num_centroids)
        with torch.inference_mode():
            q = torch.from_numpy(np.ascontiguousarray(queries, dtype=np.float32))
            if q.shape[0] <= HOST_SEARCH_MAX_ROWS:
                scores, ids = pooling.centroid_topk(q, self._host_centroids, k)
                return Nearest(ids=ids.numpy(), similarity=scores.numpy())
            q = q.to(self._device)
            if self._kernels is not None:
                scores, ids = self._kernels.centroid_topk(q, self._centroids, k)
            else:
                scores, ids = pooling.centroid_topk(q, self._centroids, k)
            return Nearest(ids=ids.cpu().numpy(), similarity=scores.cpu().numpy())

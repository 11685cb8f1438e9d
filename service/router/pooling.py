"""Pure-torch pooling and centroid scoring: the CPU path and the oracle of the fused CUDA kernels.

``kernels/router_kernels.cu`` fuses each function here into one launch; ``service/router/kernels.py``
picks the kernel when the library is loaded and the inputs are on CUDA, and these otherwise.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def mean_pool_l2norm(hidden: Tensor, mask: Tensor) -> Tensor:
    """``hidden`` [B, L, H] (any float dtype), ``mask`` [B, L] (true = token) -> [B, H] float32 unit rows.

    sentence-transformers' mean pooling: the mean of the unmasked tokens, in fp32, then L2 normalisation.
    """
    weights = mask.to(torch.float32).unsqueeze(-1)
    summed = (hidden.float() * weights).sum(dim=1)
    count = weights.sum(dim=1).clamp(min=1.0)
    return F.normalize(summed / count, dim=-1)


def centroid_topk(queries: Tensor, centroids: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Inner products of ``queries`` [B, H] with ``centroids`` [K, H] (fp32) -> the k best
    (scores [B, k], ids [B, k] int64), best first."""
    scores, ids = torch.topk(queries.float() @ centroids.float().T, k, dim=1)
    return scores, ids

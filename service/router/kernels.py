"""The fused CUDA kernels of ``kernels/`` (a plain C ABI), loaded with ctypes when built.

Optional by design: without the library, or off CUDA, callers use the torch references in
``pooling.py``. Functions here take torch tensors, launch on ``torch.cuda.current_stream()`` and
allocate through torch, so they run inside a CUDA graph capture like any torch operator.
"""

from __future__ import annotations

import ctypes
import logging
from pathlib import Path

import torch
from torch import Tensor

from service.router import pooling

logger = logging.getLogger(__name__)

LIBRARY_NAME = "router_kernels.so"
ABI_VERSION = 1  # kAbiVersion in kernels/router_kernels.cu
SHARED_MEMORY_BYTES = 48 * 1024  # the default per-block limit the centroid kernel stays under
SELF_TEST_ATOL = 1e-3  # fp16 inputs, fp32 accumulation in both: far below any real defect
_DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
_REPO_ROOT = Path(__file__).resolve().parents[2]


class KernelError(RuntimeError):
    pass


def default_library_paths() -> list[Path]:
    """Next to this package (``cmake --install build --prefix .``), then the documented build folder."""
    return [Path(__file__).resolve().parent / LIBRARY_NAME, _REPO_ROOT / "build" / LIBRARY_NAME]


class RouterKernels:
    """One loaded ``router_kernels.so``; its functions are thread-safe (they only enqueue work)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        lib = ctypes.CDLL(str(path))
        try:
            version = lib.router_kernels_abi_version()
            if version != ABI_VERSION:
                raise KernelError(
                    f"{path}: C ABI version {version}, this package needs {ABI_VERSION}; rebuild kernels/"
                )
            self.max_top_k = int(lib.router_max_top_k())
            ptr, i32 = ctypes.c_void_p, ctypes.c_int
            lib.router_mean_pool_l2norm.argtypes = [ptr, i32, ptr, i32, i32, i32, ptr, ptr]
            lib.router_mean_pool_l2norm.restype = i32
            lib.router_centroid_topk.argtypes = [ptr, ptr, i32, i32, i32, i32, ptr, ptr, ptr]
            lib.router_centroid_topk.restype = i32
        except AttributeError as exc:  # a symbol missing: another library, or one built from other sources
            raise KernelError(f"{path} is not a router kernels library: {exc}") from None
        self._lib = lib

    def self_test(self, device: torch.device | None = None) -> None:
        """Launch both kernels once on small inputs and compare them with the torch references; ``KernelError`` if
        a launch fails (a library built for another GPU or a newer driver) or an answer differs."""
        device = device or torch.device("cuda")
        generator = torch.Generator(device="cpu").manual_seed(0)
        hidden = torch.randn((3, 7, 100), generator=generator).to(device, torch.float16)  # dim not a block multiple
        mask = torch.ones((3, 7), dtype=torch.bool)
        mask[1, 4:] = False
        mask = mask.to(device)
        pooled = self.mean_pool_l2norm(hidden, mask)
        queries = torch.nn.functional.normalize(torch.randn((2, 100), generator=generator), dim=1).to(device)
        centroids = torch.nn.functional.normalize(torch.randn((9, 100), generator=generator), dim=1).to(device)
        scores, ids = self.centroid_topk(queries, centroids, 2)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        ref_scores, ref_ids = pooling.centroid_topk(queries, centroids, 2)
        close = torch.allclose(pooled, pooling.mean_pool_l2norm(hidden, mask), atol=SELF_TEST_ATOL)
        if not (close and torch.equal(ids, ref_ids) and torch.allclose(scores, ref_scores, atol=SELF_TEST_ATOL)):
            raise KernelError(f"{self.path}: the kernels' answers differ from the torch references")

    def mean_pool_l2norm(self, hidden: Tensor, mask: Tensor) -> Tensor:
        """Fused ``pooling.mean_pool_l2norm`` for CUDA tensors (fp32/fp16/bf16 in, fp32 out)."""
        if not hidden.is_cuda or hidden.dtype not in _DTYPE_CODES:
            return pooling.mean_pool_l2norm(hidden, mask)
        hidden = hidden.contiguous()
        # a bool tensor is one byte per element already: reinterpret, no copy
        mask_bytes = (mask if mask.dtype == torch.bool else mask != 0).contiguous().view(torch.uint8)
        batch, seq, dim = hidden.shape
        out = torch.empty((batch, dim), dtype=torch.float32, device=hidden.device)
        with torch.cuda.device(hidden.device):  # the launch goes to the current device, which must own the stream
            code = self._lib.router_mean_pool_l2norm(
                hidden.data_ptr(),
                _DTYPE_CODES[hidden.dtype],
                mask_bytes.data_ptr(),
                batch,
                seq,
                dim,
                out.data_ptr(),
                _stream(hidden),
            )
        _check(code, "router_mean_pool_l2norm")
        return out

    def centroid_topk(self, queries: Tensor, centroids: Tensor, k: int) -> tuple[Tensor, Tensor]:
        """Fused ``pooling.centroid_topk`` (fp32 inner products + top-k) for CUDA tensors."""
        num_centroids, dim = centroids.shape
        fits = (dim + num_centroids) * 4 <= SHARED_MEMORY_BYTES and 1 <= k <= min(num_centroids, self.max_top_k)
        if not queries.is_cuda or not fits:
            return pooling.centroid_topk(queries, centroids, k)
        queries = queries.float().contiguous()
        centroids = centroids.float().contiguous()
        batch = queries.shape[0]
        ids = torch.empty((batch, k), dtype=torch.int64, device=queries.device)
        scores = torch.empty((batch, k), dtype=torch.float32, device=queries.device)
        with torch.cuda.device(queries.device):
            code = self._lib.router_centroid_topk(
                queries.data_ptr(),
                centroids.data_ptr(),
                batch,
                num_centroids,
                dim,
                k,
                ids.data_ptr(),
                scores.data_ptr(),
                _stream(queries),
            )
        _check(code, "router_centroid_topk")
        return scores, ids


def load_kernels(path: Path | None = None, device: torch.device | None = None) -> RouterKernels | None:
    """The kernels library at ``path`` (an error if it does not load), else the first default
    location that has one; None without CUDA or without a built library. Self-tested on ``device``,
    the one it will serve on (the current CUDA device when None)."""
    if path is not None:
        if not path.is_file():
            raise KernelError(f"kernels library {path} does not exist; build it with cmake (kernels/README.md)")
        kernels = RouterKernels(path)
        kernels.self_test(device)
        return kernels
    if not torch.cuda.is_available():
        return None
    for candidate in default_library_paths():
        if candidate.is_file():
            try:  # found, not asked for: one that does not run here falls back to torch instead of failing the load
                kernels = RouterKernels(candidate)
                kernels.self_test(device)
            except (KernelError, OSError) as exc:
                logger.warning(
                    "fused CUDA kernels at %s unusable (%s); using the torch pooling and scoring", candidate, exc
                )
                continue
            logger.info("fused CUDA kernels loaded from %s", candidate)
            return kernels
    logger.info("no %s found (%s); using the torch pooling and scoring", LIBRARY_NAME, default_library_paths())
    return None


def _stream(tensor: Tensor) -> int:
    return int(torch.cuda.current_stream(tensor.device).cuda_stream)


def _check(code: int, name: str) -> None:
    if code != 0:
        raise KernelError(f"{name} failed: CUDA error {code}")

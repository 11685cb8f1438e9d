"""MiniLM on one CUDA device: length-bucketed padded batches, a copy stream, CUDA graphs, fused pooling.

One ``embed`` call, for a batch of token-id sequences:

1. CPU (the calling thread, outside any lock): sort by length, plan chunks (``buckets.py``) and
   write each chunk's ids and lengths into pinned host tensors with vectorised numpy.
2. Copy stream: every chunk's host->device copy, queued at once; an event marks their end.
3. Compute stream (under ``_launch_lock``): wait for that event, then per chunk either copy into the
   bucket's static inputs and replay its graph, or run the encoder eagerly; the pooled rows go into
   one device result, then one device->host copy into pinned memory and an event.
4. The calling thread waits on that event (the GIL is released while it waits).

Only step 3 is serialised: with two compute threads (``cuda_inflight_batches``), one packs its next
batch and another waits for its result while the GPU runs, so the GPU is not idle between batches.
The static graph buffers are safe because every replay, and the copies in and out of its buffers,
are queued on the one compute stream in order.
"""

from __future__ import annotations

import itertools
import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from service.router import pooling
from service.router.buckets import BucketGrid, Chunk
from service.router.kernels import RouterKernels
from service.router.minilm import MiniLM

logger = logging.getLogger(__name__)

# Eager passes on each bucket's shape before its capture: cuBLAS picks its algorithms and the
# allocator settles its blocks outside the graph (as torch's CUDA-graph notes advise).
CAPTURE_WARMUP_PASSES = 3
PAD_TOKEN_ID = 0  # [PAD]; padding rows get length 1 so that no attention row is fully masked


@dataclass
class _Graph:
    graph: torch.cuda.CUDAGraph
    ids: Tensor  # static input [batch, seq] int32
    lengths: Tensor  # static input [batch] int32
    pooled: Tensor  # static output [batch, hidden] float32


@dataclass(frozen=True)
class HostChunk:
    chunk: Chunk
    ids: Tensor  # [batch, seq] int32, right-padded with PAD_TOKEN_ID
    lengths: Tensor  # [batch] int32; padding rows 1


def pack_chunk(
    sequences: Sequence[Sequence[int]], rows: np.ndarray, lengths: np.ndarray, chunk: Chunk, *, pin: bool = True
) -> HostChunk:
    """CPU: the chunk's sequences ``rows`` (their ``lengths``) padded to its bucket, in (pinned)
    host memory, with one masked numpy store rather than a Python loop over rows."""
    ids = torch.full((chunk.batch, chunk.seq), PAD_TOKEN_ID, dtype=torch.int32, pin_memory=pin)
    lens = torch.ones(chunk.batch, dtype=torch.int32, pin_memory=pin)
    lens.numpy()[: chunk.rows] = lengths
    flat = np.fromiter(itertools.chain.from_iterable(sequences[i] for i in rows), dtype=np.int32)
    valid = np.arange(chunk.seq)[None, :] < lengths[:, None]
    ids.numpy()[: chunk.rows][valid] = flat
    return HostChunk(chunk, ids, lens)


class CudaEncoder:
    """Thread-safe: ``embed`` may run in several threads at once."""

    def __init__(self, model: MiniLM, *, device: torch.device, grid: BucketGrid, kernels: RouterKernels | None) -> None:
        if device.type != "cuda":
            raise ValueError(f"CudaEncoder needs a CUDA device, got {device}")
        self._model = model
        self._device = device
        self._grid = grid
        self._kernels = kernels
        self._hidden = model.cfg.hidden_size
        self._compute_stream = torch.cuda.Stream(device)
        self._copy_stream = torch.cuda.Stream(device)
        self._launch_lock = threading.Lock()
        self._graphs: dict[tuple[int, int], _Graph] = {}

    @property
    def graphs(self) -> int:
        return len(self._graphs)

    @property
    def kernels(self) -> RouterKernels | None:
        return self._kernels

    @property
    def fused_kernels(self) -> bool:
        return self._kernels is not None

    def capture_graphs(self) -> None:
        """Warm up and capture one graph per bucket of the grid (start-up, before serving)."""
        pool = torch.cuda.graph_pool_handle()
        with torch.cuda.stream(self._compute_stream), torch.inference_mode():
            for batch, seq in self._grid.buckets():
                ids = torch.full((batch, seq), PAD_TOKEN_ID, dtype=torch.int32, device=self._device)
                lengths = torch.full((batch,), seq, dtype=torch.int32, device=self._device)
                for _ in range(CAPTURE_WARMUP_PASSES):
                    self._forward(ids, lengths)
                graph = torch.cuda.CUDAGraph()
                try:
                    with torch.cuda.graph(graph, pool=pool, stream=self._compute_stream):
                        pooled = self._forward(ids, lengths)
                except RuntimeError as exc:  # e.g. an attention backend that cannot be captured: run it eagerly
                    logger.warning("CUDA graph capture failed for batch %d x seq %d, run eagerly: %s", batch, seq, exc)
                    continue
                self._graphs[(batch, seq)] = _Graph(graph, ids, lengths, pooled)
        self._compute_stream.synchronize()
        buckets = len(self._grid.buckets())
        logger.info(
            "captured %d of %d CUDA graphs: batch %s x seq %s",
            self.graphs, buckets, self._grid.batch_sizes, self._grid.seq_lens,
        )  # fmt: skip

    def embed(self, sequences: Sequence[Sequence[int]]) -> np.ndarray:
        """``[len(sequences), hidden]`` float32, L2-normalised, in input order."""
        count = len(sequences)
        lengths = np.fromiter((len(s) for s in sequences), dtype=np.int64, count=count)
        order = np.argsort(lengths, kind="stable")
        chunks = self._grid.plan(lengths[order].tolist(), graphs=bool(self._graphs))
        host = [pack_chunk(sequences, order[c.start : c.stop], lengths[order[c.start : c.stop]], c) for c in chunks]
        with self._launch_lock:
            done, pooled_host = self._launch(host, count)
        done.synchronize()
        out = np.empty((count, self._hidden), dtype=np.float32)
        out[order] = pooled_host.numpy()
        return out

    # -- steps ----------------------------------------------------------------------------------
    def _launch(self, host: list[HostChunk], count: int) -> tuple[torch.cuda.Event, Tensor]:
        """Queue copies, forward passes and the result copy; returns the event that ends them."""
        with torch.cuda.stream(self._copy_stream):
            staged = [
                (part.ids.to(self._device, non_blocking=True), part.lengths.to(self._device, non_blocking=True))
                for part in host
            ]
            copied = torch.cuda.Event()
            copied.record(self._copy_stream)
        with torch.cuda.stream(self._compute_stream), torch.inference_mode():
            self._compute_stream.wait_event(copied)
            pooled = torch.empty((count, self._hidden), dtype=torch.float32, device=self._device)
            for part, (ids, lengths) in zip(host, staged, strict=True):
                # allocated on the copy stream, read on this one: keep the allocator from reusing them early
                ids.record_stream(self._compute_stream)
                lengths.record_stream(self._compute_stream)
                chunk = part.chunk
                pooled[chunk.start : chunk.stop] = self._run(chunk, ids, lengths)[: chunk.rows]
            pooled_host = torch.empty((count, self._hidden), dtype=torch.float32, pin_memory=True)
            pooled_host.copy_(pooled, non_blocking=True)
            # blocking: a waiting thread sleeps instead of spinning a core the tokenizer threads need
            done = torch.cuda.Event(blocking=True)
            done.record(self._compute_stream)
        return done, pooled_host

    def _run(self, chunk: Chunk, ids: Tensor, lengths: Tensor) -> Tensor:
        graph = self._graphs.get((chunk.batch, chunk.seq)) if chunk.graphed else None
        if graph is None:
            return self._forward(ids, lengths)
        graph.ids.copy_(ids)
        graph.lengths.copy_(lengths)
        graph.graph.replay()
        return graph.pooled

    def _forward(self, ids: Tensor, lengths: Tensor) -> Tensor:
        hidden, mask = self._model.encode_padded(ids, lengths)
        if self._kernels is not None:
            return self._kernels.mean_pool_l2norm(hidden, mask)
        return pooling.mean_pool_l2norm(hidden, mask)

"""Prompt -> 384-d unit vector, as ``SentenceTransformer('all-MiniLM-L6-v2').encode`` does: exactly in fp32, to
within bf16's or fp16's precision in those (``resolve_dtype``).

CPU: the packed, padding-free module (``minilm.py``), TorchScript. CUDA: ``cuda_encoder.py`` (fp16 or
bf16, bucketed padded batches, CUDA graphs, the fused kernels of ``kernels/`` when built).

Thread safety: ``tokenize`` and ``embed_ids`` may be called from several threads at once (the
tokenizer is immutable once built; the model only runs under ``torch.inference_mode``). Neither is
ever called on the event loop: the batcher runs them in its worker threads.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from tokenizers import Tokenizer

from service.router.buckets import BucketGrid
from service.router.cuda_encoder import CudaEncoder
from service.router.kernels import RouterKernels, load_kernels
from service.router.minilm import MiniLM, onednn_available, prepack_for_onednn, script_for_inference
from service.router.model_card import EMBEDDING_DIM, MODEL_ID, default_model_dir, model_sha256

logger = logging.getLogger(__name__)

# Weights never come from a hub at run time.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Tokenization runs on the batcher's own thread beside busy compute workers; the Rust tokenizer's
# extra worker threads would only compete with them for cores (measured: 5-10 % fewer routes/s).
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


class Embedder(Protocol):
    """The seam the batcher and the fit tool use; tests plug in a fake."""

    model_id: str
    model_sha256: str
    dim: int
    device: str

    def tokenize(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids per text, truncated to the model's maximum sequence length."""
        ...

    def embed_ids(self, sequences: Sequence[Sequence[int]], *, cpu_threads: int | None = None) -> np.ndarray:
        """``[len(sequences), dim]`` float32, L2-normalised, in input order, using ``cpu_threads``
        intra-op threads on CPU (None: leave the calling thread's setting)."""
        ...

    @property
    def kernels(self) -> RouterKernels | None:
        """The fused CUDA kernels in use, which the torch centroid index shares; None without them."""
        ...

    def runtime_info(self) -> dict[str, object]:
        """How the encoder runs (dtype, TorchScript, CUDA graphs...), for /health."""
        ...


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} requested but CUDA is not available")
    return device


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """``auto``: fp16 on CUDA; on a CPU, bf16 where it has bf16 dot products and oneDNN runs bf16 GEMMs (as
    OpenVINO's CPU plugin picks bf16 by default there), else fp32. bf16 kept every routing decision of fp32 on
    RouterBench's prompts at 1.7x the throughput; ``float32`` asks for sentence-transformers' own numbers."""
    if name == "auto":
        if device.type == "cuda":
            return torch.float16
        return torch.bfloat16 if fast_cpu_bf16() else torch.float32
    dtypes = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
    if name not in dtypes:
        raise ValueError(f"dtype must be one of auto, {', '.join(dtypes)}; got {name!r}")
    return dtypes[name]


@dataclass(frozen=True, kw_only=True)
class CudaOptions:
    """How the CUDA path runs (``RouterSettings`` fields of the same names)."""

    graphs: bool = True
    graph_batch_sizes: str = "1,4,16,64,256,512,1024"
    graph_seq_lens: str = "16,32,64,128,256"
    max_batch_size: int = 1024
    kernels: bool = True
    kernels_path: Path | None = None


# Padded sequence lengths are multiples of this: tensor-core friendly GEMM shapes, and the
# memory-efficient SDPA kernel wants its mask's last dimension aligned to 16 elements.
SEQ_ALIGN = 16


class MiniLMEmbedder:
    """all-MiniLM-L6-v2: Rust tokenizer + the padding-free module in ``minilm.py``."""

    dim = EMBEDDING_DIM

    def __init__(
        self,
        *,
        model_dir: Path | None = None,
        device: str = "auto",
        dtype: str = "auto",
        torchscript: bool = True,
        onednn: bool = True,
        cuda: CudaOptions | None = None,
    ) -> None:
        """``torchscript`` and ``onednn`` (prepacked fp32 GEMMs) apply to CPU only; on CUDA, graphs remove the
        per-operator overhead."""
        folder = model_dir or default_model_dir()
        self.model_id = MODEL_ID
        self.model_sha256 = model_sha256(folder)
        self.torch_device = resolve_device(device)
        self.device = str(self.torch_device)
        self.dtype = resolve_dtype(dtype, self.torch_device)
        self.max_seq_length = _max_seq_length(folder)
        _check_mean_pooling(folder)
        self._tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
        self._tokenizer.enable_truncation(max_length=self.max_seq_length)
        self._tokenizer.no_padding()
        model = MiniLM.from_pretrained(folder).to(self.torch_device, self.dtype)
        if model.cfg.hidden_size != self.dim:
            raise ValueError(f"{folder}: hidden size {model.cfg.hidden_size}, expected {self.dim}")
        self._cuda: CudaEncoder | None = None
        self.onednn = False
        if self.torch_device.type == "cuda":
            self._cuda = _cuda_encoder(model, self.torch_device, cuda or CudaOptions(), self.max_seq_length)
            self._model: torch.jit.ScriptModule | MiniLM = model
        else:
            self.onednn = onednn and _prepack_for_onednn(model)
            self._model = script_for_inference(model) if torchscript else model
        self.scripted = isinstance(self._model, torch.jit.ScriptModule)

    @property
    def kernels(self) -> RouterKernels | None:
        """The fused CUDA kernels in use (None on CPU or when not built); the torch index uses them too."""
        return self._cuda.kernels if self._cuda is not None else None

    def runtime_info(self) -> dict[str, object]:
        """What /health reports about how the encoder runs."""
        info: dict[str, object] = {"dtype": str(self.dtype).removeprefix("torch."), "torchscript": self.scripted}
        if self._cuda is None:
            info["onednn_linear"] = self.onednn
        else:
            info.update(cuda_graphs=self._cuda.graphs, fused_kernels=self._cuda.fused_kernels)
        return info

    def tokenize(self, texts: Sequence[str]) -> list[list[int]]:
        # sentence-transformers strips each input before tokenizing; parity needs the same. The _fast
        # variant skips the character offsets nobody here reads: the same ids, 11-19 % less tokenizer CPU (A/B on the
        # 2-core dev VM).
        encodings = self._tokenizer.encode_batch_fast([text.strip() for text in texts], add_special_tokens=True)
        return [enc.ids for enc in encodings]

    def embed_ids(self, sequences: Sequence[Sequence[int]], *, cpu_threads: int | None = None) -> np.ndarray:
        """``cpu_threads``: intra-op threads for this call (torch's setting is per calling thread);
        None leaves the thread's current setting."""
        if not sequences:
            return np.zeros((0, self.dim), dtype=np.float32)
        if self._cuda is not None:
            return self._cuda.embed(sequences)
        order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]))
        groups: list[tuple[int, int]] = []
        flat: list[int] = []
        positions: list[int] = []
        for i in order:
            seq = sequences[i]
            flat.extend(seq)
            positions.extend(range(len(seq)))
            if groups and groups[-1][0] == len(seq):
                groups[-1] = (len(seq), groups[-1][1] + 1)
            else:
                groups.append((len(seq), 1))
        ids = torch.tensor(flat, dtype=torch.long)
        pos = torch.tensor(positions, dtype=torch.long)
        if cpu_threads is not None:
            torch.set_num_threads(cpu_threads)
        with torch.inference_mode():
            pooled = self._model(ids, pos, groups).numpy()
        out = np.empty_like(pooled)
        out[order] = pooled
        return out

    def embed(self, texts: Sequence[str], batch_size: int = 64) -> np.ndarray:
        """Convenience for offline use (fit, tests): tokenize and embed in length-sorted batches."""
        ids = self.tokenize(texts)
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
        out = np.empty((len(ids), self.dim), dtype=np.float32)
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            out[chunk] = self.embed_ids([ids[i] for i in chunk])
        return out


def _prepack_for_onednn(model: MiniLM) -> bool:
    """Prepack a CPU model's GEMM weights for oneDNN (fp32, or bf16 where oneDNN runs it); False (and nn.Linear
    kept) where that cannot run."""
    dtype = next(model.parameters()).dtype
    if dtype == torch.bfloat16 and not native_bf16():
        logger.warning("bfloat16 on a CPU without bf16 dot products (AVX512-BF16, AMX): expect it slower than float32")
    if not onednn_available(dtype):
        logger.warning("oneDNN cannot run %s GEMMs here; the encoder's GEMMs run on torch's default BLAS", dtype)
        return False
    try:
        prepack_for_onednn(model)
    except Exception:
        logger.warning("oneDNN prepacking failed; the encoder's GEMMs run on torch's default BLAS", exc_info=True)
        return False
    return True


def fast_cpu_bf16() -> bool:
    """Whether bf16 is the faster CPU dtype here: bf16 instructions, and oneDNN able to run its packed bf16 GEMM."""
    return native_bf16() and onednn_available(torch.bfloat16)


def native_bf16() -> bool:
    """Whether the CPU has bf16 dot-product instructions (AVX512-BF16 or AMX); torch only says so privately."""
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(bool(getattr(torch.cpu, name, lambda: False)()) for name in checks)


def _cuda_encoder(model: MiniLM, device: torch.device, options: CudaOptions, max_seq_length: int) -> CudaEncoder:
    grid = BucketGrid.from_specs(
        options.graph_batch_sizes,
        options.graph_seq_lens,
        seq_align=SEQ_ALIGN,
        max_rows=options.max_batch_size,
        max_seq=max_seq_length,
    )
    kernels = load_kernels(options.kernels_path, device) if options.kernels else None
    encoder = CudaEncoder(model, device=device, grid=grid, kernels=kernels)
    if options.graphs:
        encoder.capture_graphs()
    return encoder


def _max_seq_length(folder: Path) -> int:
    config = folder / "sentence_bert_config.json"
    if config.exists():
        return int(json.loads(config.read_text())["max_seq_length"])
    return 256


def _check_mean_pooling(folder: Path) -> None:
    config = folder / "1_Pooling" / "config.json"
    if config.exists() and not json.loads(config.read_text()).get("pooling_mode_mean_tokens", False):
        raise ValueError(f"{folder}: only mean pooling is supported")

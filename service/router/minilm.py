"""all-MiniLM-L6-v2 (a 6-layer BERT) as a padding-free torch module.

A batch is *packed*: the sequences, sorted by length, are concatenated into one ``[tokens]`` tensor,
so every linear layer (where nearly all the FLOPs are) runs on real tokens only, never on padding.
Attention runs once per run of equal-length sequences (``groups``), each a dense ``[n, heads, L, d]``
block that needs no mask. This is the CPU analogue of the varlen attention TEI uses on GPUs.
Outputs are the sentence-transformers embedding: mean pooling over tokens, then L2 normalisation.

``encode_padded`` is the CUDA form: one right-padded ``[batch, seq]`` block with a key padding mask,
a fixed shape per call, so that the CUDA encoder (``cuda_encoder.py``) can capture it in a graph.
"""

from __future__ import annotations

import json
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import Tensor, nn

logger = logging.getLogger(__name__)

# A batch's runs of equal-length sequences, in packing order: (sequence length, number of sequences).
# Spelled out as list[tuple[int, int]] in signatures, the type TorchScript understands.


@dataclass(frozen=True)
class BertConfig:
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    max_positions: int
    layer_norm_eps: float

    @classmethod
    def from_file(cls, path: Path) -> BertConfig:
        raw = json.loads(path.read_text())
        if raw.get("hidden_act", "gelu") != "gelu" or raw.get("position_embedding_type", "absolute") != "absolute":
            raise ValueError(f"{path}: only BERT with exact GELU and absolute positions is supported")
        return cls(
            vocab_size=raw["vocab_size"],
            hidden_size=raw["hidden_size"],
            num_layers=raw["num_hidden_layers"],
            num_heads=raw["num_attention_heads"],
            intermediate_size=raw["intermediate_size"],
            max_positions=raw["max_position_embeddings"],
            layer_norm_eps=raw["layer_norm_eps"],
        )


# The row count oneDNN's packed weight layout is chosen for. Any hint from 32 rows up gave the same speed for
# every batch from 22 to 5,000 tokens (2-core Zen 4 VM); a hint of 1 was 20 % slower on small batches.
ONEDNN_PACK_ROWS = 256
# fp16 is left out: oneDNN runs it natively only with AMX-FP16, and no CPU here had it to measure.
ONEDNN_DTYPES = (torch.float32, torch.bfloat16)


class OneDnnLinear(nn.Module):
    """``nn.Linear`` for CPU inference, its weight reordered once into oneDNN's blocked layout.

    torch's CPU ``addmm`` calls MKL, which on AMD CPUs keeps to its AVX2 kernels (capping it at AVX2 with
    ``MKL_ENABLE_INSTRUCTIONS`` did not slow it); oneDNN runs the widest ISA the CPU has. On the 2-core Zen 4 VM
    (AVX-512) the encoder's GEMMs ran 13-22 % faster this way and a one-thread forward pass 13-23 % faster; with
    AVX2 only, the two measured alike. The maths stays fp32 (on the parity prompts, cosine >= 0.99999994 against
    ``nn.Linear``). A bf16 layer packs a bf16 weight: oneDNN then runs the CPU's bf16 dot products (AVX512-BF16,
    AMX), fp32 accumulation. The op is torch's own (the one inductor's CPU freezing pass emits), so it scripts like
    any other. Inference only: the packed weight is an opaque oneDNN tensor that ``state_dict()`` and ``.to()`` skip.
    """

    def __init__(self, linear: nn.Linear, activation: str = "none") -> None:
        """``activation``: "none", or "gelu" (exact, erf) applied inside the GEMM as oneDNN's post-op."""
        super().__init__()
        if linear.bias is None:
            raise ValueError("OneDnnLinear needs a bias")
        if linear.weight.dtype not in ONEDNN_DTYPES:
            raise ValueError(f"OneDnnLinear runs fp32 or bf16, not {linear.weight.dtype}")
        if activation not in ("none", "gelu"):
            raise ValueError(f"unsupported activation {activation!r}")
        self.activation = activation
        # oneDNN names the GELU variant: "none" is the exact erf form (nn.GELU's default), as BERT uses.
        self.algorithm = "none" if activation == "gelu" else ""
        with torch.no_grad():
            self.weight = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), ONEDNN_PACK_ROWS)
            self.bias = linear.bias.detach()

    def forward(self, x: Tensor) -> Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, self.activation, [], self.algorithm)


class BertLayer(nn.Module):
    def __init__(self, cfg: BertConfig) -> None:
        super().__init__()
        h = cfg.hidden_size
        self.num_heads = cfg.num_heads
        self.head_dim = h // cfg.num_heads
        self.eps = cfg.layer_norm_eps
        # Typed as Module: prepack_for_onednn swaps them for OneDnnLinear on CPU.
        self.qkv: nn.Module = nn.Linear(h, 3 * h)  # query, key and value fused: one GEMM instead of three
        self.attn_out: nn.Module = nn.Linear(h, h)
        self.attn_norm = nn.LayerNorm(h, eps=cfg.layer_norm_eps)
        self.ffn_in: nn.Module = nn.Linear(h, cfg.intermediate_size)
        self.ffn_act: nn.Module = nn.GELU()  # an Identity once prepack_for_onednn fuses it into ffn_in
        self.ffn_out: nn.Module = nn.Linear(cfg.intermediate_size, h)
        self.ffn_norm = nn.LayerNorm(h, eps=cfg.layer_norm_eps)

    def forward(self, x: Tensor, groups: list[tuple[int, int]]) -> Tensor:
        hidden = x.shape[1]
        qkv = self.qkv(x)
        attn = torch.empty_like(x)
        start = 0
        for length, count in groups:
            stop = start + length * count
            block = qkv[start:stop].view(count, length, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
            out = F.scaled_dot_product_attention(block[0], block[1], block[2])
            attn[start:stop] = out.transpose(1, 2).reshape(length * count, hidden)
            start = stop
        x = self.attn_norm(self.attn_out(attn) + x)
        return self.ffn_norm(self.ffn_out(self.ffn_act(self.ffn_in(x))) + x)

    def forward_padded(self, x: Tensor, attend: Tensor) -> Tensor:
        """``x`` [B, L, H]; ``attend`` [B, 1, 1, L] bool, false on padding keys."""
        batch, length, hidden = x.shape
        qkv = self.qkv(x).view(batch, length, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        attn = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2], attn_mask=attend)
        attn = attn.transpose(1, 2).reshape(batch, length, hidden)
        x = self.attn_norm(self.attn_out(attn) + x)
        return self.ffn_norm(self.ffn_out(self.ffn_act(self.ffn_in(x))) + x)


class MiniLM(nn.Module):
    """BERT encoder + mean pooling + L2 normalisation, on packed, length-sorted sequences."""

    def __init__(self, cfg: BertConfig) -> None:
        super().__init__()
        self.cfg = cfg
        h = cfg.hidden_size
        self.word_embeddings = nn.Embedding(cfg.vocab_size, h)
        self.position_embeddings = nn.Embedding(cfg.max_positions, h)
        # Token type is always 0 for single sentences; its row is folded into a bias.
        self.token_type = nn.Parameter(torch.zeros(h))
        self.embed_norm = nn.LayerNorm(h, eps=cfg.layer_norm_eps)
        self.layers = nn.ModuleList(BertLayer(cfg) for _ in range(cfg.num_layers))

    def forward(self, input_ids: Tensor, positions: Tensor, groups: list[tuple[int, int]]) -> Tensor:
        """``input_ids``/``positions``: ``[tokens]``; ``groups``: (length, count) runs. -> ``[sequences, hidden]``."""
        x = self.word_embeddings(input_ids) + self.position_embeddings(positions) + self.token_type
        x = self.embed_norm(x)
        for layer in self.layers:
            x = layer(x, groups)
        pooled = []
        start = 0
        for length, count in groups:
            stop = start + length * count
            pooled.append(x[start:stop].view(count, length, -1).float().mean(dim=1))
            start = stop
        return F.normalize(torch.cat(pooled), dim=-1)

    def encode_padded(self, input_ids: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor]:
        """``input_ids`` [B, L] right-padded, ``lengths`` [B] (each >= 1) -> the last hidden state
        [B, L, H] and the token mask [B, L]; pooling is the caller's (a fused kernel on CUDA)."""
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        mask = positions[None, :] < lengths[:, None]
        x = self.word_embeddings(input_ids) + self.position_embeddings(positions)[None] + self.token_type
        x = self.embed_norm(x)
        attend = mask[:, None, None, :]
        for layer in self.layers:
            assert isinstance(layer, BertLayer)  # ModuleList items are typed as Module
            x = layer.forward_padded(x, attend)
        return x, mask

    @classmethod
    def from_pretrained(cls, model_dir: Path) -> MiniLM:
        """Build from a Hugging Face BERT folder (config.json + model.safetensors)."""
        cfg = BertConfig.from_file(model_dir / "config.json")
        state = load_file(str(model_dir / "model.safetensors"))
        model = cls(cfg)
        model.load_state_dict(_convert_hf_state(state, cfg.num_layers), strict=True)
        return model.eval()


LINEAR_NAMES = ("qkv", "attn_out", "ffn_in", "ffn_out")


def onednn_available(dtype: torch.dtype = torch.float32) -> bool:
    """Whether this torch and CPU run ``OneDnnLinear`` in ``dtype``: a build can carry oneDNN and still fail to
    create the primitive at the first call (the pack succeeds, the GEMM raises), so one tiny GEMM of each kind is
    run."""
    if not torch.backends.mkldnn.is_available() or dtype not in ONEDNN_DTYPES:
        return False
    if dtype == torch.bfloat16 and not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return False
    probe = nn.Linear(8, 8).to(dtype)
    try:
        with torch.inference_mode():
            for activation in ("none", "gelu"):
                OneDnnLinear(probe, activation)(torch.zeros(2, 8, dtype=dtype))
    except Exception:
        logger.warning("oneDNN cannot run its packed GEMM here", exc_info=True)
        return False
    return True


def prepack_for_onednn(model: MiniLM) -> MiniLM:
    """Swap every layer's linear layers for ``OneDnnLinear``, the FFN's GELU fused into its first GEMM
    (an fp32 or bf16 CPU model; in place, returned for chaining). A model already packed is left as it is."""
    # Everything is packed before anything is swapped, so a failure leaves the model as it was.
    swaps: list[tuple[nn.Module, str, nn.Module]] = []
    for layer in model.layers:
        if not all(isinstance(getattr(layer, name), nn.Linear) for name in LINEAR_NAMES):
            continue
        for name in LINEAR_NAMES:
            swaps.append((layer, name, OneDnnLinear(getattr(layer, name), "gelu" if name == "ffn_in" else "none")))
        swaps.append((layer, "ffn_act", nn.Identity()))
    for layer, name, module in swaps:
        setattr(layer, name, module)
    return model


def script_for_inference(model: MiniLM) -> torch.jit.ScriptModule | MiniLM:
    """TorchScript the encoder, or return it unchanged where scripting is unavailable.

    A scripted forward runs in C++ without taking the GIL between operators, so the event loop's
    Python work (HTTP, scoring) no longer stalls the compute threads: +10-25% routes/s through
    HTTP on 2 CPU cores (benchmarks/). Numerically identical to eager mode.
    """
    try:
        with warnings.catch_warnings():
            # torch marks TorchScript deprecated in favour of torch.compile, which does not yet
            # release the GIL for a whole forward pass; the eager fallback covers its removal.
            warnings.filterwarnings("ignore", message=".*torch.jit.script.*deprecated", category=DeprecationWarning)
            return torch.jit.script(model)
    except Exception:
        logger.warning("TorchScript unavailable; running the encoder in eager mode", exc_info=True)
        return model


def _convert_hf_state(hf: dict[str, Tensor], num_layers: int) -> dict[str, Tensor]:
    """Map Hugging Face ``BertModel`` names onto this module (fusing Q, K and V)."""
    prefix = "bert." if any(k.startswith("bert.") for k in hf) else ""

    def get(name: str) -> Tensor:
        return hf[prefix + name]

    out = {
        "word_embeddings.weight": get("embeddings.word_embeddings.weight"),
        "position_embeddings.weight": get("embeddings.position_embeddings.weight"),
        "token_type": get("embeddings.token_type_embeddings.weight")[0],
        "embed_norm.weight": get("embeddings.LayerNorm.weight"),
        "embed_norm.bias": get("embeddings.LayerNorm.bias"),
    }
    for i in range(num_layers):
        src = f"encoder.layer.{i}."
        dst = f"layers.{i}."
        for part in ("weight", "bias"):
            out[dst + "qkv." + part] = torch.cat(
                [get(f"{src}attention.self.{name}.{part}") for name in ("query", "key", "value")]
            )
            out[dst + "attn_out." + part] = get(f"{src}attention.output.dense.{part}")
            out[dst + "attn_norm." + part] = get(f"{src}attention.output.LayerNorm.{part}")
            out[dst + "ffn_in." + part] = get(f"{src}intermediate.dense.{part}")
            out[dst + "ffn_out." + part] = get(f"{src}output.dense.{part}")
            out[dst + "ffn_norm." + part] = get(f"{src}output.LayerNorm.{part}")
    return out

"""The fp16 model export the GPU run carries: same tokenizer, same model hash, near-identical embeddings."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from service.router.embedder import MiniLMEmbedder
from service.router.model_card import EXPORT_INFO, default_model_dir, model_sha256
from service.router.model_export import export_model
from tests.unit.test_embedder_parity import OFFICIAL_SHA256, PROMPTS

MIN_COSINE = 0.9999


def test_fp16_export_loads_as_the_same_model(tmp_path: Path) -> None:
    weights = export_model(default_model_dir(), tmp_path / "fp16")
    assert {t.dtype for t in load_file(str(weights)).values() if t.is_floating_point()} == {torch.float16}
    assert (tmp_path / "fp16" / EXPORT_INFO).is_file() and (tmp_path / "fp16" / "1_Pooling" / "config.json").is_file()
    assert model_sha256(tmp_path / "fp16") == OFFICIAL_SHA256 == model_sha256(default_model_dir())
    exported = MiniLMEmbedder(model_dir=tmp_path / "fp16", device="cpu", dtype="float32", torchscript=False)
    original = MiniLMEmbedder(device="cpu", dtype="float32", torchscript=False)
    assert exported.model_sha256 == original.model_sha256  # the shipped router weights accept it
    assert exported.tokenize(PROMPTS) == original.tokenize(PROMPTS)
    got, ref = exported.embed(PROMPTS), original.embed(PROMPTS)
    assert (got * ref).sum(axis=1).min() >= MIN_COSINE
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, rtol=1e-5)

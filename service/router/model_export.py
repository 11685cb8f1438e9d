"""A half-precision copy of the model folder, for machines that cannot install the model package.

``export_model`` writes the weights cast to fp16 (or bf16) plus the tokenizer and config files the
embedder and sentence-transformers read, and ``router_export.json`` naming the source file's sha256.
The embedder reports that source hash for an export (``model_sha256``): the export is the same model
the CUDA path already runs in fp16, so weights fitted with the original still apply to it.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from service.digest import file_sha256
from service.router.model_card import EXPORT_INFO, WEIGHTS_FILE

# What MiniLMEmbedder and SentenceTransformer(folder) read besides the weights.
MODEL_FILES = (
    "config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.txt",
    "modules.json",
    "sentence_bert_config.json",
    "config_sentence_transformers.json",
    "1_Pooling/config.json",
)


def export_model(source: Path, target: Path, dtype: torch.dtype = torch.float16) -> Path:
    """Write ``target`` (created) from the model folder ``source``; returns the weights file written."""
    target.mkdir(parents=True, exist_ok=True)
    state = load_file(str(source / WEIGHTS_FILE))
    cast = {name: (t.to(dtype) if t.is_floating_point() else t).contiguous() for name, t in state.items()}
    save_file(cast, str(target / WEIGHTS_FILE), metadata={"format": "pt"})
    for name in MODEL_FILES:
        if (source / name).is_file():
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source / name, target / name)
    info = {"source_sha256": file_sha256(source / WEIGHTS_FILE), "dtype": str(dtype).removeprefix("torch.")}
    (target / EXPORT_INFO).write_text(json.dumps(info, indent=1) + "\n")
    return target / WEIGHTS_FILE

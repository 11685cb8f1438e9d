"""Embedding for the offline commands (``fit``, ``eval``, ``add-model``): the service's own embedder in
length-sorted batches with a progress bar, and an optional cache file.

The cache (``.npz``) holds the embeddings with the sha256 of the texts (JSON list) and of the embedder's
weights; it is used only when both match, and rewritten otherwise, so a stale cache cannot leak in.
"""

from __future__ import annotations

import hashlib
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from service.router.embedder import MiniLMEmbedder

EMBEDDER_BATCH_SIZE = 64
PROGRESS_DESCRIPTION = "embedding"


@dataclass(frozen=True, eq=False)
class Embedded:
    vectors: np.ndarray  # [N, D] float32, unit rows
    embedder_id: str
    embedder_sha256: str


def texts_sha256(texts: Sequence[str]) -> str:
    return hashlib.sha256(json.dumps(list(texts), ensure_ascii=False).encode()).hexdigest()


def embed_texts(texts: Sequence[str], *, cache: Path | None = None, progress: bool = True) -> Embedded:
    """Embed with MiniLM (float32, so the result does not depend on the machine), reusing ``cache`` when it
    holds exactly these texts embedded by this embedder."""
    # Imported here so fitting code and its tests do not pay for torch unless they embed.
    from service.router.embedder import MiniLMEmbedder

    embedder = MiniLMEmbedder(dtype="float32")
    digest = texts_sha256(texts)
    if cache is not None:
        cached = read_cache(cache, digest, embedder.model_sha256)
        if cached is not None:
            return Embedded(cached, embedder.model_id, embedder.model_sha256)
    vectors = _embed_batches(embedder, texts, progress)
    if cache is not None:
        write_cache(cache, vectors, digest, embedder.model_id, embedder.model_sha256)
    return Embedded(vectors, embedder.model_id, embedder.model_sha256)


def _embed_batches(embedder: MiniLMEmbedder, texts: Sequence[str], progress: bool) -> np.ndarray:
    """As ``MiniLMEmbedder.embed`` (the same length-sorted batches, so the same vectors), with a progress bar."""
    from tqdm import tqdm

    ids = embedder.tokenize(texts)
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    out = np.empty((len(ids), embedder.dim), dtype=np.float32)
    with tqdm(total=len(ids), desc=PROGRESS_DESCRIPTION, unit="prompt", file=sys.stderr, disable=not progress) as bar:
        for start in range(0, len(order), EMBEDDER_BATCH_SIZE):
            chunk = order[start : start + EMBEDDER_BATCH_SIZE]
            out[chunk] = embedder.embed_ids([ids[i] for i in chunk])
            bar.update(len(chunk))
    return out


def read_cache(path: Path, texts_digest: str, embedder_sha256: str) -> np.ndarray | None:
    """The cached vectors, or None when the file is missing, unreadable or for other texts or another embedder."""
    try:
        with np.load(path, allow_pickle=False) as data:
            if str(data["texts_sha256"]) != texts_digest or str(data["embedder_sha256"]) != embedder_sha256:
                return None
            return np.asarray(data["vectors"], dtype=np.float32)
    except (OSError, KeyError, ValueError):
        return None


def write_cache(path: Path, vectors: np.ndarray, texts_digest: str, embedder_id: str, embedder_sha256: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as fh:
        np.savez(
            fh,
            vectors=vectors,
            texts_sha256=np.array(texts_digest),
            embedder_id=np.array(embedder_id),
            embedder_sha256=np.array(embedder_sha256),
        )

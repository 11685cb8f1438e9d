"""Embedding for the offline commands (``fit``, ``eval``, ``add-model``): the service's own embedder in
length-sorted batches with a progress bar, and an optional cache file.

The cache (``.npz``) holds the embeddings with the sha256 of the texts (JSON list) and of the embedder's
weights; it is used only when both match, and rewritten otherwise, so a stale cache cannot leak in.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import tempfile
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from service.router.weights import WRITTEN_FILE_MODE

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


class NotACache(ValueError):
    """The cache path holds a file that is not an embedding cache: it is not overwritten."""


ZIP_MAGIC = b"PK\x03\x04"  # how every .npz begins


def read_cache(path: Path, texts_digest: str, embedder_sha256: str) -> np.ndarray | None:
    """The cached vectors, or None when there is no file, it caches other texts or another embedder, or it is a
    damaged archive (a run of an older version interrupted while writing): it is then rewritten. ``NotACache`` for
    any other file: a mistyped path (the weights file, say) must not be replaced."""
    try:
        # Opened here, not by np.load, which leaks its file handle when the archive is damaged.
        with path.open("rb") as fh, np.load(fh, allow_pickle=False) as data:
            if str(data["texts_sha256"]) != texts_digest or str(data["embedder_sha256"]) != embedder_sha256:
                return None
            return np.asarray(data["vectors"], dtype=np.float32)
    except FileNotFoundError:
        return None
    except (OSError, KeyError, ValueError, EOFError, zipfile.BadZipFile, AttributeError) as exc:
        # a damaged archive is one that starts as a zip and breaks as one; a whole zip without the cache's arrays
        # (another .npz, a torch checkpoint, a spreadsheet) is someone else's file
        if isinstance(exc, zipfile.BadZipFile | EOFError) and _starts_with(path, ZIP_MAGIC):
            return None
        raise NotACache(
            f"--embedding-cache {path} is not an embedding cache ({type(exc).__name__}); refusing to overwrite it: "
            "remove it or pass another path"
        ) from None


def _starts_with(path: Path, magic: bytes) -> bool:
    try:
        with path.open("rb") as fh:
            return fh.read(len(magic)) == magic
    except OSError:
        return False


def write_cache(path: Path, vectors: np.ndarray, texts_digest: str, embedder_id: str, embedder_sha256: str) -> None:
    """Write atomically (a temporary file beside it, then a rename): an interrupted run leaves the old cache or
    none, never half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            np.savez(
                fh,
                vectors=vectors,
                texts_sha256=np.array(texts_digest),
                embedder_id=np.array(embedder_id),
                embedder_sha256=np.array(embedder_sha256),
            )
        os.chmod(tmp_name, WRITTEN_FILE_MODE)  # mkstemp makes it 0600; the cache is as readable as the weights
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise

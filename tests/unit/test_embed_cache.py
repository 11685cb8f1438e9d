"""The offline commands' embedding cache: reused only when it matches, and never fatal when it is damaged."""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import pytest

from service.router.offline.embed import NotACache, read_cache, texts_sha256, write_cache

SHA = "ab" * 32


def _write(path: Path) -> np.ndarray:
    vectors = np.arange(12, dtype=np.float32).reshape(3, 4)
    write_cache(path, vectors, texts_sha256(["a", "b", "c"]), "toy", SHA)
    return vectors


def test_cache_round_trip_and_mismatches(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "cache.npz"
    vectors = _write(path)
    np.testing.assert_array_equal(read_cache(path, texts_sha256(["a", "b", "c"]), SHA), vectors)
    assert read_cache(path, texts_sha256(["a", "b"]), SHA) is None
    assert read_cache(path, texts_sha256(["a", "b", "c"]), "cd" * 32) is None
    assert read_cache(tmp_path / "missing.npz", texts_sha256(["a"]), SHA) is None
    assert [p.name for p in path.parent.iterdir()] == ["cache.npz"]  # no temporary file left beside it
    assert path.stat().st_mode & 0o777 == 0o644


@pytest.mark.parametrize("damage", ["truncated", "zip-magic-only"])
def test_a_damaged_cache_is_ignored(tmp_path: Path, damage: str) -> None:
    # A run interrupted while writing the cache left a truncated .npz; the next run died with BadZipFile.
    path = tmp_path / "cache.npz"
    _write(path)
    whole = path.read_bytes()
    damaged = {"truncated": whole[:300], "zip-magic-only": b"PK\x03\x04garbage"}[damage]
    path.write_bytes(damaged)
    assert read_cache(path, texts_sha256(["a", "b", "c"]), SHA) is None


@pytest.mark.parametrize("content", [b"garbage", b"", b"\x08\x00\x00\x00{}"])  # text, empty, a safetensors head
def test_a_file_that_is_no_cache_is_refused_not_overwritten(tmp_path: Path, content: bytes) -> None:
    """A mistyped --embedding-cache (the weights file, say) was silently replaced by an npz."""
    path = tmp_path / "router-weights.safetensors"
    path.write_bytes(content)
    with pytest.raises(NotACache, match="refusing to overwrite"):
        read_cache(path, texts_sha256(["a"]), SHA)
    assert path.read_bytes() == content


def test_a_whole_zip_that_is_not_this_cache_is_refused(tmp_path: Path) -> None:
    """Anything starting as a zip was taken for a damaged cache and replaced: another .npz, a torch checkpoint."""
    other = tmp_path / "other.npz"
    np.savez(other, weights=np.ones(3))
    with pytest.raises(NotACache):
        read_cache(other, texts_sha256(["a"]), SHA)
    checkpoint = tmp_path / "model.pt"
    with zipfile.ZipFile(checkpoint, "w") as archive:
        archive.writestr("archive/data.pkl", b"not an npz member")
    with pytest.raises(NotACache):
        read_cache(checkpoint, texts_sha256(["a"]), SHA)

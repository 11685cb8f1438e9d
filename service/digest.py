"""File digests and the source commit, without heavy imports (the fit tool hashes its data, the embedder its
model; results record the commit they were measured at)."""

from __future__ import annotations

import hashlib
import subprocess
from pathlib import Path

CHUNK_BYTES = 1 << 22
GIT_TIMEOUT_S = 10.0


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


# The checkout this package runs from, when it runs from one: the folder holding service/.
SOURCE_ROOT = Path(__file__).resolve().parents[1]


def source_commit(root: Path = SOURCE_ROOT) -> str | None:
    """The commit of the code running now: its checkout's, or None for an installed package, also when that is
    installed inside another project's repository (a .venv in it), whose commit would say nothing of this code."""
    return git_commit(root) if (root / ".git").exists() else None


def git_commit(directory: Path) -> str | None:
    """The commit checked out at ``directory``, with ``-dirty`` when tracked files differ from it (a result
    measured on uncommitted code must say so); None outside a git checkout."""
    try:
        done = subprocess.run(
            ["git", "describe", "--always", "--dirty", "--abbrev=40", "--exclude=*"],
            cwd=directory, capture_output=True, text=True, timeout=GIT_TIMEOUT_S, check=False,
        )  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() or None if done.returncode == 0 else None

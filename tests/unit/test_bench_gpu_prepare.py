"""gpu_prepare.py deletes only the folder it made and needs a git checkout; gpu.sh needs what it prepared."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from benchmarks import gpu_prepare
from benchmarks.common import REPO_ROOT


def test_a_folder_gpu_prepare_did_not_make_is_refused_not_deleted(tmp_path: Path) -> None:
    victim = tmp_path / "precious"
    victim.mkdir()
    (victim / "data.txt").write_text("keep me")
    with pytest.raises(SystemExit, match=r"not made by gpu_prepare\.py"):
        gpu_prepare.fresh_carry(victim)
    assert (victim / "data.txt").read_text() == "keep me"


def test_its_own_folder_is_emptied_and_marked(tmp_path: Path) -> None:
    carry = tmp_path / ".carry"
    gpu_prepare.fresh_carry(carry)
    assert (carry / gpu_prepare.MARKER).is_file()
    (carry / "wheels").mkdir()
    gpu_prepare.fresh_carry(carry)  # a second run replaces its own output
    assert sorted(p.name for p in carry.iterdir()) == [gpu_prepare.MARKER]


def test_outside_a_git_checkout_it_says_so(tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match="must be a git checkout"):
        gpu_prepare.tree_bytes(tmp_path)


def test_gpu_sh_without_the_prepared_folder_says_to_run_gpu_prepare(tmp_path: Path) -> None:
    (tmp_path / "benchmarks").mkdir()
    shutil.copy(REPO_ROOT / "benchmarks" / "gpu.sh", tmp_path / "benchmarks" / "gpu.sh")
    proc = subprocess.run(["bash", str(tmp_path / "benchmarks" / "gpu.sh"), "test"], capture_output=True, text=True,
                          env={"PATH": "/usr/bin:/bin", "OUT": str(tmp_path / "out")}, timeout=30)  # fmt: skip
    assert proc.returncode == 1
    assert "run 'python benchmarks/gpu_prepare.py' first" in proc.stderr
    assert not (tmp_path / "out").exists()  # it stopped before doing anything

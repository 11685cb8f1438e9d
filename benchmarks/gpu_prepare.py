"""Prepare what ``benchmarks/gpu.sh`` needs on the GPU machine, which reaches no registry and gets only
64 MiB of ignored files per call: ``python benchmarks/gpu_prepare.py`` (here, from the repo root).

Writes ``.carry/`` (git-ignored; pass ``carry=[".carry"]`` to the device tool), replacing an earlier run's output
(marked by a ``.made-by-gpu-prepare`` file); any other folder at ``--carry`` is refused, not deleted:

* ``model-fp16/``: the model as fp16 safetensors (45 MB instead of 91 MB) with its tokenizer and config,
  via ``service.router.model_export``; the router loads it with ``LLMROUTER_MODEL_DIR``.
* ``wheels/``: the service's pure-Python or small dependencies the device image lacks, for CPython 3.12
  manylinux, at the versions installed here (``pip download --no-deps``). FAISS is not among them: its
  wheel (about 30 MB) does not fit beside the model, so the GPU run uses the exact torch index
  (``--index-backend auto`` falls back to it, logs a warning and /health reports ``"index": "torch-cuda"``).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from service.digest import git_commit  # noqa: E402  (torch-free; the path above makes the package importable)

# Left in the folder this script writes: only a folder that has it is deleted on the next run.
MARKER = ".made-by-gpu-prepare"
COMMIT_FILE = "commit"  # read by benchmarks.common.machine_info on the device, whose tree has no .git
CARRY_LIMIT_BYTES = 64 * 1024 * 1024  # the device tool's cap on the working tree plus carried paths
DEVICE_PYTHON = "3.12"
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64", "manylinux1_x86_64")
# Missing from (or possibly too old in) the device image, per /work/.library/device/KINDS.md.
# typing-extensions: the carried anyio needs a newer one than some images hold.
WHEELS = (
    "starlette", "anyio", "hypercorn", "h11", "h2", "hpack", "hyperframe", "priority", "wsproto", "orjson",
    "pynacl", "cffi", "pycparser", "tomlkit", "redis", "pytest", "pluggy", "iniconfig", "pytest-asyncio",
    "hdrhistogram", "pbr", "typing-extensions",
)  # fmt: skip


def download_wheels(target: Path) -> None:
    """Into ``target`` only once every wheel is there: gpu.sh takes an existing wheels/ folder as complete, and a
    failed download found on the device costs device time."""
    partial = target.with_name(target.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    pins = [f"{name}=={importlib.metadata.version(name)}" for name in WHEELS]
    platform_args = [arg for p in PLATFORMS for arg in ("--platform", p)]
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-d", str(partial),
               "--python-version", DEVICE_PYTHON, "--implementation", "cp", *platform_args, *pins]  # fmt: skip
    if subprocess.run(command, check=False).returncode != 0:
        raise SystemExit(f"pip could not download the device's wheels ({', '.join(pins)}); nothing carried")
    partial.rename(target)


def tree_bytes(repo: Path = REPO) -> int:
    """What travels besides .carry: tracked plus untracked-not-ignored files."""
    try:
        listed = subprocess.run(
            ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
            cwd=repo, check=True, capture_output=True,
        ).stdout.split(b"\0")  # fmt: skip
    except (OSError, subprocess.CalledProcessError) as exc:
        raise SystemExit(f"{repo} must be a git checkout (the device tool carries git's files): {exc}") from None
    return sum((repo / name.decode()).stat().st_size for name in listed if name and (repo / name.decode()).is_file())


def fresh_carry(folder: Path) -> None:
    """Empty ``folder`` for a new export; a folder this script did not make is refused, never deleted."""
    if folder.exists():
        if not (folder / MARKER).is_file():
            raise SystemExit(
                f"{folder} exists and was not made by gpu_prepare.py (no {MARKER} in it): not deleting it; "
                "remove it yourself or pass another --carry"
            )
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    (folder / MARKER).write_text("written by benchmarks/gpu_prepare.py; deleted by its next run\n")


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--carry", type=Path, default=REPO / ".carry", help="output folder (git-ignored)")
    parser.add_argument("--model-dir", type=Path, default=None, help="source model (default: the model package)")
    args = parser.parse_args()
    tree = tree_bytes()  # fails outside a git checkout, before anything is written
    fresh_carry(args.carry)
    # Imported here: the model code pulls in torch, which the checks above do not need.
    from service.router.model_card import default_model_dir
    from service.router.model_export import export_model

    export_model(args.model_dir or default_model_dir(), args.carry / "model-fp16")
    download_wheels(args.carry / "wheels")
    # the device's copy of the tree has no .git: results there name the commit carried
    (args.carry / COMMIT_FILE).write_text(f"{git_commit(REPO) or 'unknown'}\n")
    model, wheels = folder_bytes(args.carry / "model-fp16"), folder_bytes(args.carry / "wheels")
    total = model + wheels + tree
    print(f"model {model / 2**20:.1f} MiB + wheels {wheels / 2**20:.1f} MiB + tree {tree / 2**20:.1f} MiB "
          f"= {total / 2**20:.1f} MiB of {CARRY_LIMIT_BYTES / 2**20:.0f}")  # fmt: skip
    if total > CARRY_LIMIT_BYTES:
        raise SystemExit("over the device tool's 64 MiB limit: carry less")


if __name__ == "__main__":
    main()

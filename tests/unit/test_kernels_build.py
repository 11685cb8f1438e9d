"""The top-level CMake build compiles kernels/ with nvcc (no GPU needed) and the library loads."""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from service.router import kernels as kernels_module
from service.router.kernels import ABI_VERSION, LIBRARY_NAME, KernelError, RouterKernels, load_kernels

REPO = Path(__file__).resolve().parents[2]
# One architecture keeps the compile short; the default list (80;90) is for deployments.
TEST_ARCHITECTURE = "80"
BUILD_TIMEOUT_S = 600

needs_toolchain = pytest.mark.skipif(
    shutil.which("cmake") is None or shutil.which("nvcc") is None, reason="needs cmake and nvcc"
)


@needs_toolchain
def test_cmake_builds_the_kernels_library(tmp_path: Path) -> None:
    build = tmp_path / "build"
    configure = ["cmake", "-S", str(REPO), "-B", str(build), f"-DROUTER_CUDA_ARCHITECTURES={TEST_ARCHITECTURE}"]
    subprocess.run(configure, check=True, capture_output=True, timeout=BUILD_TIMEOUT_S)
    subprocess.run(["cmake", "--build", str(build)], check=True, capture_output=True, timeout=BUILD_TIMEOUT_S)
    library = build / LIBRARY_NAME
    assert library.is_file()
    # Loading needs no GPU: cudart is linked statically and loads the driver only on first use.
    raw = ctypes.CDLL(str(library))
    assert raw.router_kernels_abi_version() == ABI_VERSION
    kernels = RouterKernels(library)
    assert kernels.max_top_k >= 1


@needs_toolchain
@pytest.mark.parametrize(
    ("flags", "architectures"),
    [([], "80;90"), (["-DROUTER_CUDA_ARCHITECTURES=90"], "90"), (["-DCMAKE_CUDA_ARCHITECTURES=90"], "90")],
)
def test_cmake_builds_for_the_architectures_asked(tmp_path: Path, flags: list[str], architectures: str) -> None:
    """CMake's own -DCMAKE_CUDA_ARCHITECTURES was overwritten by the project's default list (two device compiles)."""
    configure = ["cmake", "-S", str(REPO), "-B", str(tmp_path / "build"), *flags]
    done = subprocess.run(configure, check=True, capture_output=True, text=True, timeout=BUILD_TIMEOUT_S)
    assert f"router kernels: building for CUDA architectures {architectures}\n" in done.stdout


def test_a_configured_library_that_is_missing_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(KernelError, match="does not exist"):
        load_kernels(tmp_path / LIBRARY_NAME)


def test_a_library_without_the_kernels_symbols_is_a_kernel_error() -> None:
    """A missing symbol raised AttributeError, which the fallback to torch did not catch: start-up failed."""
    libc = ctypes.util.find_library("c")
    assert libc is not None
    with pytest.raises(KernelError, match="is not a router kernels library"):
        RouterKernels(Path(libc))


class FailingKernels:
    """A library that loads but whose kernels do not run here (built for another GPU, or a newer driver)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def self_test(self, device: torch.device | None = None) -> None:
        raise KernelError(f"{self.path}: router_mean_pool_l2norm failed: CUDA error 209")


def test_a_found_library_that_does_not_run_here_falls_back_to_torch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    library = tmp_path / LIBRARY_NAME
    library.write_bytes(b"")
    monkeypatch.setattr(kernels_module.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(kernels_module, "default_library_paths", lambda: [library])
    monkeypatch.setattr(kernels_module, "RouterKernels", FailingKernels)
    with caplog.at_level(logging.WARNING, logger=kernels_module.__name__):
        assert load_kernels() is None  # the router serves with the torch references instead of failing to load
    assert "unusable" in caplog.text and "CUDA error 209" in caplog.text
    with pytest.raises(KernelError, match="CUDA error 209"):  # asked for by path: an error
        load_kernels(library)


def test_the_library_is_self_tested_on_the_serving_device(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With --device cuda:1 the self-test ran on the current device, cuda:0: a library that does not run on
    the serving GPU passed, or a busy device 0 was touched."""
    tested_on: list[torch.device | None] = []

    class RecordingKernels:
        def __init__(self, path: Path) -> None:
            self.path = path

        def self_test(self, device: torch.device | None = None) -> None:
            tested_on.append(device)

    library = tmp_path / LIBRARY_NAME
    library.write_bytes(b"")
    monkeypatch.setattr(kernels_module.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(kernels_module, "default_library_paths", lambda: [library])
    monkeypatch.setattr(kernels_module, "RouterKernels", RecordingKernels)
    serving = torch.device("cuda", 1)
    assert isinstance(load_kernels(None, serving), RecordingKernels)
    assert isinstance(load_kernels(library, serving), RecordingKernels)
    assert tested_on == [serving, serving]


def _unloaded_kernels() -> RouterKernels:
    """A RouterKernels without a library: off CUDA its methods fall back to the torch references."""
    kernels = RouterKernels.__new__(RouterKernels)
    kernels.path, kernels.max_top_k = Path(LIBRARY_NAME), 8
    return kernels


def test_the_self_test_passes_answers_that_match_the_references() -> None:
    _unloaded_kernels().self_test(torch.device("cpu"))


@pytest.mark.parametrize("broken", ["pooling", "topk"])
def test_the_self_test_refuses_kernels_whose_answers_differ(broken: str, monkeypatch: pytest.MonkeyPatch) -> None:
    kernels = _unloaded_kernels()
    if broken == "pooling":  # e.g. the mean taken over padding too
        monkeypatch.setattr(kernels, "mean_pool_l2norm", lambda hidden, mask: kernels_module.pooling.mean_pool_l2norm(
            hidden, torch.ones_like(mask)))  # fmt: skip
    else:  # the runner-up reported first
        monkeypatch.setattr(kernels, "centroid_topk", lambda q, c, k: tuple(
            t.flip(1) for t in kernels_module.pooling.centroid_topk(q, c, k)))  # fmt: skip
    with pytest.raises(KernelError, match="differ from the torch references"):
        kernels.self_test(torch.device("cpu"))

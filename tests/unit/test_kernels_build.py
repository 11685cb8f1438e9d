"""The top-level CMake build compiles kernels/ with nvcc (no GPU needed) and the library loads."""

from __future__ import annotations

import ctypes
import shutil
import subprocess
from pathlib import Path

import pytest

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


def test_a_configured_library_that_is_missing_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(KernelError, match="does not exist"):
        load_kernels(tmp_path / LIBRARY_NAME)

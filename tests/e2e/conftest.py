"""End-to-end: the real server (``python -m service serve-router``) in a subprocess on a free port."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.redis_server import free_port

STARTUP_TIMEOUT_S = 120.0
STOP_TIMEOUT_S = 60.0
REPO = Path(__file__).resolve().parents[2]


@dataclass
class Server:
    process: subprocess.Popen[bytes]
    url: str
    log_path: Path

    def wait_ready(self, timeout_s: float = STARTUP_TIMEOUT_S) -> None:
        wait_http_ok(f"{self.url}/health", self.process, timeout_s=timeout_s, what="server", log=self.log)

    def stop(self, timeout_s: float = STOP_TIMEOUT_S) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


def wait_http_ok(
    url: str,
    process: subprocess.Popen[bytes],
    *,
    timeout_s: float,
    what: str,
    log: Callable[[], str],
    poll_s: float = 0.05,
) -> None:
    """Poll ``url`` until it answers 200; fail at once if ``process`` exits, and after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{what} exited with {process.returncode}:\n{log()}")
        try:
            if httpx.get(url, timeout=1.0).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(poll_s)
    raise TimeoutError(f"{what} not ready after {timeout_s}s:\n{log()}")


def start_server(
    tmp_dir: Path, *args: str, wait: bool = True, command: str = "serve-router", port: int | None = None
) -> Server:
    """``python -m service <command> --host 127.0.0.1 --port <free> *args``, its output in a log file."""
    port = port or free_port()
    return start_process(
        tmp_dir,
        [sys.executable, "-m", "service", command, "--host", "127.0.0.1", "--port", str(port), *args],
        url=f"http://127.0.0.1:{port}",
        name=f"{command}-{port}",
        wait=wait,
    )


def start_process(tmp_dir: Path, argv: list[str], *, url: str, name: str, wait: bool = True) -> Server:
    log_path = tmp_dir / f"{name}.log"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    with log_path.open("wb") as log:
        process = subprocess.Popen(argv, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    server = Server(process=process, url=url, log_path=log_path)
    if wait:
        server.wait_ready()
    return server


@pytest.fixture(scope="session")
def router(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """One real router (real model, shipped weights) shared by the read-only end-to-end tests."""
    server = start_server(tmp_path_factory.mktemp("router"))
    yield server
    assert server.stop() == 0, server.log()

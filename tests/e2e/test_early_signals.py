"""Signals that reach a server while it still starts (imports, settings, the model): their default dispositions
killed it (SIGTERM: exit 143, SIGHUP: exit 129), where a stop promises a drain and exit 0 and SIGHUP a reload."""

from __future__ import annotations

import functools
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.e2e.conftest import REPO, STARTUP_TIMEOUT_S, STOP_TIMEOUT_S, free_port

POLL_S = 0.002
SIGHUP_BIT = 1 << (signal.SIGHUP - 1)  # /proc/PID/status masks: bit N-1 for signal N


def sighup_ignored(pid: int) -> bool:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("SigIgn:"):
            return bool(int(line.split()[1], 16) & SIGHUP_BIT)
    return False


def start(tmp_path: Path, command: str) -> tuple[subprocess.Popen[bytes], Path]:
    log_path = tmp_path / f"{command}.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "service", command, "--host", "127.0.0.1", "--port", str(free_port())],
            cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
            preexec_fn=functools.partial(signal.signal, signal.SIGHUP, signal.SIG_DFL),  # not inherited ignored
        )  # fmt: skip
    return process, log_path


def wait_until_holding(process: subprocess.Popen[bytes], log_path: Path) -> None:
    """Until the process holds its signals (SIGHUP ignored): from then on until its loop serves."""
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while not sighup_ignored(process.pid):
        assert process.poll() is None, log_path.read_text()
        assert time.monotonic() < deadline, "the server never held its signals"
        time.sleep(POLL_S)


@pytest.mark.parametrize("command", ["serve-router", "serve-dispatcher"])
def test_sighup_then_sigterm_while_starting_drain_and_exit_0(tmp_path: Path, command: str) -> None:
    process, log_path = start(tmp_path, command)
    try:
        wait_until_holding(process, log_path)
        process.send_signal(signal.SIGHUP)
        process.send_signal(signal.SIGTERM)
        code = process.wait(STOP_TIMEOUT_S)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert code == 0, log_path.read_text()
    assert "drained" in log_path.read_text()

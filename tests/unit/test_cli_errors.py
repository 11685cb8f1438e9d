"""Mistakes a user makes on the command line end in one ``error:`` line and a non-zero exit, not a traceback."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest

from service.cli import main

STARTUP_TIMEOUT_S = 60


def test_keygen_into_a_missing_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    target = tmp_path / "no-such-folder" / "signing.key"
    assert main(["keygen", str(target)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: No such file or directory") and "no-such-folder" in err


def test_add_endpoint_into_a_missing_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["add-endpoint", "e1", "--config", str(tmp_path / "missing" / "endpoints.toml")]) == 1
    assert capsys.readouterr().err.startswith("error: No such file or directory")


def test_serve_on_a_port_in_use_exits_1_before_starting() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = subprocess.run(
            [sys.executable, "-m", "service", "serve-dispatcher", "--port", str(port)],
            capture_output=True,
            text=True,
            timeout=STARTUP_TIMEOUT_S,
        )
    assert done.returncode == 1, done.stderr
    assert "error: [Errno 98] Address already in use" in done.stderr
    assert "Traceback" not in done.stderr
    assert "dispatcher serving" not in done.stderr  # nothing started before the bind failed

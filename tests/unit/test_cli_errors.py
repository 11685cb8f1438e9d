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


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--redis-url", "http://127.0.0.1:6379/0"], "error: --redis-url http://127.0.0.1:6379/0: Redis URL must"),
        (["--redis-url", "redis://:pw@h:notaport/0"], "error: --redis-url redis://:***@h:notaport/0: Port could not"),
        (["--log-level", "loud"], "error: --log-level must be debug, info, warning, error or critical"),
    ],
)
def test_serve_dispatcher_refuses_bad_settings_in_one_line_before_binding(
    flags: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """Each was a traceback (the Redis URL once the server had started, the level when logging was configured)."""
    assert main(["serve-dispatcher", "--port", "0", *flags]) == 2
    err = capsys.readouterr().err
    assert err.startswith(message) and "Traceback" not in err and "pw" not in err, err

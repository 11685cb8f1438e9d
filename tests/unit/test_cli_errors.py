"""Mistakes a user makes on the command line end in one ``error:`` line and a non-zero exit, not a traceback."""

from __future__ import annotations

import json
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
    err = capsys.readouterr().err
    assert err.startswith("error: cannot update") and "No such file or directory" in err


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
        # past the URL parser: every call was a 500 (redis-py refuses the argument only when it builds a connection)
        (["--redis-url", "redis://:pw@h/0?socket_timout=1"], "error: --redis-url redis://:***@h/0?socket_timout=1: "),
        (["--redis-url", "redis://h/0?ssl_password=pw"], "error: --redis-url redis://h/0?ssl_password=***: "),
        (["--redis-url", "redis://h/0?protocol=4"], "error: --redis-url redis://h/0?protocol=4: "),  # a RedisError
        (["--log-level", "loud"], "error: --log-level must be one of debug, info, warning, error, critical"),
    ],
)
def test_serve_dispatcher_refuses_bad_settings_in_one_line_before_binding(
    flags: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """Each was a traceback (the Redis URL once the server had started, the level when logging was configured)."""
    assert main(["serve-dispatcher", "--port", "0", *flags]) == 2
    err = capsys.readouterr().err
    assert err.startswith(message) and "Traceback" not in err and "pw" not in err, err


def test_keygen_names_the_file_that_exists(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    key = tmp_path / "dispatch.key"
    Path(f"{key}.pub").write_text("left over\n")
    assert main(["keygen", str(key)]) == 1
    assert f"error: {key}.pub exists" in capsys.readouterr().err  # it said dispatch.key, which did not exist
    assert not key.exists()


@pytest.mark.parametrize("content", ["not hex\n", "ab" * 16 + "\n", "\xff"])
@pytest.mark.parametrize(
    ("flag", "name", "what"),
    [("--signing-key-file", "dispatch.key", "signing key"), ("--next-public-key-file", "next.key.pub", "public key")],
)
def test_a_bad_key_file_is_named_in_one_line(
    tmp_path: Path, content: str, flag: str, name: str, what: str, capsys: pytest.CaptureFixture[str]
) -> None:
    key = tmp_path / name
    key.write_bytes(content.encode("latin-1"))
    key.chmod(0o600)
    assert main(["serve-dispatcher", "--port", "0", flag, str(key)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {what} {key}") and err.count("\n") == 1 and "Traceback" not in err, err


def test_inspect_weights_refuses_weights_the_router_would_refuse(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """It called a file valid that the router then refused: fitted with another embedder."""
    import dataclasses

    from service.router.weights import default_weights_path, load_weights, save_weights

    shipped = load_weights(default_weights_path())
    other = tmp_path / "other.safetensors"
    save_weights(dataclasses.replace(shipped, embedder_id="someone/else"), other)
    assert main(["inspect-weights", str(other)]) == 1
    assert "fitted with someone/else" in capsys.readouterr().err
    # the same model id, another weights file of it: the router compares the file's sha256 too
    save_weights(dataclasses.replace(shipped, embedder_sha256="0" * 64), other)
    assert main(["inspect-weights", str(other)]) == 1
    assert "sha256 000000000000..., but the running embedder is" in capsys.readouterr().err
    assert main(["inspect-weights"]) == 0


def test_inspect_weights_checks_the_model_the_router_is_configured_with(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """It hashed the package's model while the router loads LLMROUTER_MODEL_DIR."""
    from service.router.model_card import EXPORT_INFO

    (tmp_path / EXPORT_INFO).write_text(json.dumps({"source_sha256": "a" * 64}))  # an export of another file
    monkeypatch.setenv("LLMROUTER_MODEL_DIR", str(tmp_path))
    assert main(["inspect-weights"]) == 1
    assert "but the running embedder is sentence-transformers/all-MiniLM-L6-v2 sha256 aaaaaaaaaaaa" in (
        capsys.readouterr().err
    )
    (tmp_path / EXPORT_INFO).write_text("{}")  # not an export's info: a clear error, not a traceback
    assert main(["inspect-weights"]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"invalid: cannot read the model in {tmp_path}") and "Traceback" not in err


def test_serve_refuses_a_port_out_of_range_before_starting_anything(capsys: pytest.CaptureFixture[str]) -> None:
    """The dispatcher child refused it (2) after the router child had started; serve then exited 15, the SIGTERM it
    had sent the router."""
    with pytest.raises(SystemExit) as exited:
        main(["serve", "--dispatcher-port", "99999"])
    assert exited.value.code == 2
    assert "--dispatcher-port: must be 0-65535" in capsys.readouterr().err


class FakeChild:
    """A service child process: ``exits_with`` on its own after one poll, or killed by the first signal sent."""

    def __init__(self, exits_with: int | None) -> None:
        self.exits_with = exits_with
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.exits_with is not None:
            self.returncode = self.exits_with
        return self.returncode

    def send_signal(self, signum: int) -> None:
        self.returncode = -signum  # died of it, before its own handler was installed

    def wait(self) -> int:
        assert self.returncode is not None
        return self.returncode


def test_serve_exits_with_the_code_of_the_service_that_ended_first(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """It exited 15 (the SIGTERM sent to the surviving service) instead of the failing service's 2, and said
    nothing of which one had failed (LLMROUTER_WORKERS=2 reaches both: the dispatcher refuses it without Redis)."""
    import signal
    import subprocess

    children = iter([FakeChild(exits_with=None), FakeChild(exits_with=2)])
    monkeypatch.setattr(subprocess, "Popen", lambda *args, **kwargs: next(children))
    monkeypatch.setattr(signal, "signal", lambda *args: None)
    assert main(["serve", "--router-port", "0", "--dispatcher-port", "0"]) == 2
    assert "error: serve-dispatcher exited (2); stopping the other service" in capsys.readouterr().err


def test_a_secret_given_as_a_flag_is_warned_about(capsys: pytest.CaptureFixture[str]) -> None:
    """`ps` shows a process's arguments to every local user: the admin token or the signing key's seed with them."""
    assert main(["serve-dispatcher", "--admin-token=s3cret", "--signing-key", "00", "--port", "70000"]) == 2
    err = capsys.readouterr().err
    assert "warning: --admin-token on the command line is visible to every local user (ps); set" in err
    assert "LLMROUTER_SIGNING_KEY instead" in err and "s3cret" not in err
    assert main(["serve-dispatcher", "--signing-key-file", "k", "--port", "70000"]) == 2
    assert "warning" not in capsys.readouterr().err
    assert main(["serve-dispatcher", "--admin-tok", "s3cret", "--port", "70000"]) == 2  # argparse's abbreviation
    assert "warning: --admin-token on the command line" in capsys.readouterr().err

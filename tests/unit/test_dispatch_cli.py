"""The dispatcher's command-line tools, run in process: keygen, add-endpoint, add-key, serve-dispatcher checks."""

from __future__ import annotations

import os
import re
import stat
from pathlib import Path
from typing import Any

import pytest

from service import cli
from service.dispatch.endpoints import hash_key, load_config
from service.dispatch.signing import read_key_file, write_key_file


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """No LLMROUTER_* variable of the caller's leaks into the settings; HF_HUB_OFFLINE set by main is undone."""
    for name in list(os.environ):
        if name.startswith("LLMROUTER_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture
def never_serve(monkeypatch: pytest.MonkeyPatch) -> None:
    """serve-dispatcher must refuse before it binds: reaching the server fails the test instead of listening."""
    import service.http.server

    def refuse(*args: Any, **kwargs: Any) -> int:
        raise AssertionError("serve() reached: the command should have exited before binding")

    monkeypatch.setattr(service.http.server, "serve", refuse)
    monkeypatch.setattr(service.http.server, "configure_logging", lambda *args, **kwargs: None)


def keys_from(output: str) -> tuple[str, str]:
    api = re.search(r"^api key:\s+(\S+)$", output, re.MULTILINE)
    worker = re.search(r"^worker token:\s+(\S+)$", output, re.MULTILINE)
    assert api and worker, output
    return api.group(1), worker.group(1)


# -- keygen -----------------------------------------------------------------------------------------------------
def test_keygen_creates_a_private_key_and_its_public_key(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "signing.key"
    assert cli.main(["keygen", str(path)]) == 0
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    signer = read_key_file(path)
    public = Path(f"{path}.pub").read_text().strip()
    assert public == signer.public_key.hex()
    out = capsys.readouterr().out
    assert public in out and signer.key_id in out


def test_keygen_refuses_to_overwrite(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "signing.key"
    assert cli.main(["keygen", str(path)]) == 0
    before = path.read_bytes()
    capsys.readouterr()
    assert cli.main(["keygen", str(path)]) == 1
    assert "refusing to overwrite" in capsys.readouterr().err
    assert path.read_bytes() == before
    Path(f"{path}.pub").unlink()  # the private key alone left: nothing written, no public key left behind
    assert cli.main(["keygen", str(path)]) == 1
    assert path.read_bytes() == before and not Path(f"{path}.pub").exists()


def test_keygen_does_not_write_through_a_planted_symlink(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """exists() is false for a dangling link, and the public key was then written through it: keygen (often run as
    root) created or filled a file of the planter's choice."""
    victim = tmp_path / "victim.conf"
    path = tmp_path / "new.key"
    Path(f"{path}.pub").symlink_to(victim)
    assert cli.main(["keygen", str(path)]) == 1
    assert "refusing to overwrite" in capsys.readouterr().err
    assert not victim.exists() and not path.exists()


# -- add-endpoint, add-key --------------------------------------------------------------------------------------
def test_add_endpoint_prints_keys_whose_hashes_are_stored(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "endpoints.toml"
    argv = ["add-endpoint", "gpt-4o", "--config", str(config), "--max-workers", "4", "--target-util", "0.8"]
    assert cli.main([*argv, "--cold-workers", "1", "--max-queue-time-s", "12.5", "--min-workers", "1"]) == 0
    api_key, worker_token = keys_from(capsys.readouterr().out)
    assert api_key.startswith("dk_") and worker_token.startswith("wt_")
    text = config.read_text()
    assert hash_key(api_key) in text and hash_key(worker_token) in text
    assert api_key not in text and worker_token not in text
    registry = load_config(config)
    spec = registry.get("gpt-4o")
    assert spec is not None
    assert (spec.api_key_sha256, spec.worker_token_sha256) == ((hash_key(api_key),), (hash_key(worker_token),))
    assert (spec.max_workers, spec.target_util, spec.cold_workers, spec.max_queue_time_s, spec.min_workers) == (
        4, 0.8, 1, 12.5, 1
    )  # fmt: skip
    assert registry.authenticate_client("gpt-4o", api_key) == spec
    assert registry.authenticate_worker("gpt-4o", worker_token) == spec
    assert registry.authenticate_client("gpt-4o", worker_token) is None


def test_add_endpoint_keeps_other_endpoints_and_refuses_a_duplicate(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "endpoints.toml"
    assert cli.main(["add-endpoint", "a", "--config", str(config)]) == 0
    key_a, _ = keys_from(capsys.readouterr().out)
    assert cli.main(["add-endpoint", "b", "--config", str(config)]) == 0
    key_b, _ = keys_from(capsys.readouterr().out)
    before = config.read_bytes()
    assert cli.main(["add-endpoint", "a", "--config", str(config)]) == 1
    assert "exists" in capsys.readouterr().err
    assert config.read_bytes() == before
    registry = load_config(config)
    assert sorted(registry.endpoints) == ["a", "b"]
    assert registry.authenticate_client("a", key_a) is not None
    assert registry.authenticate_client("b", key_b) is not None
    assert registry.authenticate_client("b", key_a) is None


@pytest.mark.parametrize(
    "extra", [["--target-util", "0"], ["--min-workers", "5", "--max-workers", "2"], ["--cold-workers", "-1"]]
)
def test_add_endpoint_rejects_bad_settings(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], extra: list[str]
) -> None:
    config = tmp_path / "endpoints.toml"
    assert cli.main(["add-endpoint", "ep", "--config", str(config), *extra]) == 1
    assert capsys.readouterr().err.startswith("error:")
    assert not config.exists()


def test_add_endpoint_rejects_a_bad_name(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "endpoints.toml"
    assert cli.main(["add-endpoint", "no/slash", "--config", str(config)]) == 1
    assert "name" in capsys.readouterr().err
    assert not config.exists()


def test_add_key_worker_adds_a_second_token(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "endpoints.toml"
    assert cli.main(["add-endpoint", "ep", "--config", str(config)]) == 0
    api_key, first_token = keys_from(capsys.readouterr().out)
    assert cli.main(["add-key", "ep", "--config", str(config), "--kind", "worker"]) == 0
    match = re.search(r"^worker token for ep: (wt_\S+)$", capsys.readouterr().out, re.MULTILINE)
    assert match
    second_token = match.group(1)
    assert second_token != first_token
    registry = load_config(config)
    spec = registry.get("ep")
    assert spec is not None
    assert spec.worker_token_sha256 == (hash_key(first_token), hash_key(second_token))
    assert spec.api_key_sha256 == (hash_key(api_key),)
    for token in (first_token, second_token):
        assert registry.authenticate_worker("ep", token) == spec
    assert registry.authenticate_client("ep", second_token) is None


def test_add_key_api_is_the_default(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "endpoints.toml"
    assert cli.main(["add-endpoint", "ep", "--config", str(config)]) == 0
    first_key, _ = keys_from(capsys.readouterr().out)
    assert cli.main(["add-key", "ep", "--config", str(config)]) == 0
    match = re.search(r"^api key for ep: (dk_\S+)$", capsys.readouterr().out, re.MULTILINE)
    assert match
    registry = load_config(config)
    assert registry.authenticate_client("ep", first_key) is not None
    assert registry.authenticate_client("ep", match.group(1)) is not None


def test_add_key_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "endpoints.toml"
    assert cli.main(["add-key", "ep", "--config", str(config)]) == 1  # no file
    assert f"no endpoint named 'ep' in {config}" in capsys.readouterr().err
    assert not config.exists()  # nothing written
    assert cli.main(["add-endpoint", "ep", "--config", str(config)]) == 0
    before = config.read_bytes()
    assert cli.main(["add-key", "nope", "--config", str(config)]) == 1
    assert "no endpoint named 'nope'" in capsys.readouterr().err
    assert config.read_bytes() == before
    with pytest.raises(SystemExit):
        cli.main(["add-key", "ep", "--config", str(config), "--kind", "admin"])  # argparse refuses the choice


# -- serve-dispatcher refuses before binding --------------------------------------------------------------------
@pytest.mark.usefixtures("never_serve")
def test_serve_dispatcher_with_several_workers_needs_redis(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["serve-dispatcher", "--workers", "2", "--port", "0"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "--redis-url" in err


def test_serve_dispatcher_help_says_several_workers_need_redis(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        cli.main(["serve-dispatcher", "--help"])
    assert exited.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    workers_help = text[text.index("--workers WORKERS server processes") :]
    assert "each with its own state" not in text  # memory mode refuses --workers 2
    assert workers_help.startswith("--workers WORKERS server processes sharing the port (more than 1 needs --redis-url")


@pytest.mark.usefixtures("never_serve")
@pytest.mark.parametrize(
    ("argv", "env"),
    [
        (["--worker-forget-s", "10"], {}),
        (["--heartbeat-timeout-s", "7200"], {}),
        ([], {"LLMROUTER_WORKER_FORGET_S": "5"}),
    ],
)
def test_serve_dispatcher_refuses_to_forget_workers_before_they_are_inactive(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], argv: list[str], env: dict[str, str]
) -> None:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert cli.main(["serve-dispatcher", "--port", "0", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --worker-forget-s") and "must be >= --heartbeat-timeout-s" in err


@pytest.mark.usefixtures("never_serve")
def test_serve_dispatcher_refuses_a_non_positive_max_report_value(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["serve-dispatcher", "--port", "0", "--max-report-value", "0"]) == 2
    assert "--max-report-value" in capsys.readouterr().err


@pytest.mark.usefixtures("never_serve")
def test_serve_dispatcher_reads_workers_from_the_environment_too(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("LLMROUTER_WORKERS", "3")
    assert cli.main(["serve-dispatcher", "--port", "0"]) == 2
    assert "--redis-url" in capsys.readouterr().err


@pytest.mark.usefixtures("never_serve")
@pytest.mark.parametrize(
    "content",
    ["[endpoints.ep\n", "[endpoints.ep]\nmax_worker = 3\n", "[endpoints.ep]\ntarget_util = 2.0\n", 'endpoints = "x"\n'],
)
def test_serve_dispatcher_with_a_malformed_config_exits_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], content: str
) -> None:
    config = tmp_path / "endpoints.toml"
    config.write_text(content)
    assert cli.main(["serve-dispatcher", "--config", str(config), "--port", "0"]) == 2
    assert capsys.readouterr().err.startswith("error:")


@pytest.mark.usefixtures("never_serve")
def test_serve_dispatcher_with_a_missing_config_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["serve-dispatcher", "--config", str(tmp_path / "missing.toml"), "--port", "0"]) == 2
    assert "cannot read" in capsys.readouterr().err


@pytest.mark.usefixtures("never_serve")
def test_serve_dispatcher_with_a_readable_signing_key_exits_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    key = tmp_path / "signing.key"
    write_key_file(key)
    key.chmod(0o644)
    assert cli.main(["serve-dispatcher", "--signing-key-file", str(key), "--port", "0"]) == 2
    assert "chmod 600" in capsys.readouterr().err


@pytest.mark.usefixtures("never_serve")
def test_serve_dispatcher_with_a_bad_setting_value_exits_2(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("LLMROUTER_MAX_COST", "lots")
    assert cli.main(["serve-dispatcher", "--port", "0"]) == 2
    assert "LLMROUTER_MAX_COST" in capsys.readouterr().err


def test_serve_dispatcher_reaches_the_server_when_everything_checks_out(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The counterpart of the refusals above: a valid command does get to serve() (stubbed here)."""
    import service.http.server

    config = tmp_path / "endpoints.toml"
    assert cli.main(["add-endpoint", "ep", "--config", str(config)]) == 0
    key = tmp_path / "signing.key"
    write_key_file(key)
    seen: list[Any] = []

    def fake_serve(factory: Any, settings: Any) -> int:
        seen.append(settings)
        return 0

    monkeypatch.setattr(service.http.server, "serve", fake_serve)
    monkeypatch.setattr(service.http.server, "configure_logging", lambda *args, **kwargs: None)
    monkeypatch.setenv("LLMROUTER_WORKER_FORGET_S", "120")
    argv = ["serve-dispatcher", "--config", str(config), "--signing-key-file", str(key), "--port", "0",
            "--max-report-value", "5e6"]  # fmt: skip
    assert cli.main(argv) == 0
    (settings,) = seen
    assert (settings.config, settings.signing_key_file, settings.port, settings.workers) == (config, key, 0, 1)
    assert (settings.worker_forget_s, settings.max_report_value) == (120.0, 5e6)


def test_redis_timeout_reaches_the_store() -> None:
    from service.config import DispatcherSettings
    from service.dispatch.app import open_store
    from service.dispatch.redis_store import RedisStore

    store = open_store(DispatcherSettings.from_env({}, redis_url="redis://127.0.0.1:1/0", redis_timeout_s=0.25))
    assert isinstance(store, RedisStore)
    kwargs = store._redis.connection_pool.connection_kwargs
    assert (kwargs["socket_timeout"], kwargs["socket_connect_timeout"]) == (0.25, 0.25)
    with pytest.raises(ValueError, match="--redis-timeout-s must be a finite number > 0"):
        DispatcherSettings.from_env({}, redis_timeout_s=0.0)

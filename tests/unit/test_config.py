from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import torch

from service.config import RouterSettings, settings_summary
from service.dispatch.signing import MAX_BATCH_LEAVES


def test_defaults() -> None:
    s = RouterSettings.from_env({})
    assert s.port == 8080
    assert s.weights is None
    assert s.max_batch_size == 64


def test_env_with_prefix_and_types() -> None:
    s = RouterSettings.from_env(
        {
            "LLMROUTER_PORT": "9000",
            "LLMROUTER_CACHE_TTL_S": "1.5",
            "LLMROUTER_WEIGHTS": "/tmp/w.safetensors",
            "PORT": "1",
        }
    )
    assert s.port == 9000
    assert s.cache_ttl_s == 1.5
    assert s.weights == Path("/tmp/w.safetensors")


def test_flags_beat_env() -> None:
    parser = argparse.ArgumentParser()
    RouterSettings.add_arguments(parser)
    args = parser.parse_args(["--port", "7000", "--max-queue", "8"])
    s = RouterSettings.from_args(args, {"LLMROUTER_PORT": "9000", "LLMROUTER_MAX_BATCH_SIZE": "16"})
    assert s.port == 7000
    assert s.max_queue == 8
    assert s.max_batch_size == 16  # env still applies where no flag was given


def test_bad_env_value_names_the_variable() -> None:
    with pytest.raises(ValueError, match="LLMROUTER_PORT='abc'"):
        RouterSettings.from_env({"LLMROUTER_PORT": "abc"})


def test_a_refused_setting_from_the_environment_names_its_variable_beside_the_flag() -> None:
    env = {"LLMROUTER_CACHE_TTL_S": "-1", "LLMROUTER_MAX_BODY_BYTES": "10", "LLMROUTER_MAX_BUFFERED_BODY_BYTES": "5"}
    with pytest.raises(ValueError) as refused:
        RouterSettings.from_env(env)
    assert "--cache-ttl-s (LLMROUTER_CACHE_TTL_S) must be" in str(refused.value)
    assert (
        "--max-buffered-body-bytes (LLMROUTER_MAX_BUFFERED_BODY_BYTES) must be 0 (auto) or at least --max-body-bytes"
        " (LLMROUTER_MAX_BODY_BYTES);" in str(refused.value)
    )
    # a flag beats the variable: its problem is the flag's alone
    with pytest.raises(ValueError) as refused:
        RouterSettings.from_env({"LLMROUTER_CACHE_TTL_S": "60"}, cache_ttl_s=-2.0, max_body_bytes=10)
    assert "--cache-ttl-s must be" in str(refused.value) and "LLMROUTER" not in str(refused.value)


def test_compute_nice_from_env_and_its_bounds() -> None:
    assert RouterSettings.from_env({}).compute_nice == 10
    assert RouterSettings.from_env({"LLMROUTER_COMPUTE_NICE": "0"}).compute_nice == 0
    for bad in (-1, 20):
        with pytest.raises(ValueError, match="--compute-nice must be 0-19"):
            RouterSettings.from_env({}, compute_nice=bad)


def test_summary_masks_secrets() -> None:
    s = RouterSettings.from_env({"LLMROUTER_ADMIN_TOKEN": "sekrit"})
    assert settings_summary(s)["admin_token"] == "***"
    assert "sekrit" not in repr(settings_summary(s))


def test_default_weights_path_is_the_shipped_file() -> None:
    assert RouterSettings.from_env({}).resolved_weights().name.endswith(".safetensors")


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--max-queue", "0"], "--max-queue must be >= 1"),
        (["--max-batch-size", "0"], "--max-batch-size must be >= 1"),
        (["--max-batch-tokens", "-5"], "--max-batch-tokens must be >= 1"),
        (["--top-clusters", "0"], "--top-clusters must be >= 1"),
        (["--compute-threads", "-1"], "--compute-threads must be >= 0"),
        (["--cache-ttl-s", "-1"], "--cache-ttl-s must be a positive"),
        (["--cache-ttl-s", "inf"], "--cache-ttl-s must be a positive"),
        (["--device", "bogus"], "--device must be auto, cpu, cuda or cuda:N"),
        (["--dtype", "float64"], "--dtype must be one of"),
        (["--index-backend", "bogus"], "--index-backend must be one of"),
        (["--cuda-graph-seq-lens", "16,x"], "--cuda-graph-seq-lens must be positive integers"),
        (["--workers", "0"], "--workers must be >= 1"),
        (["--listen-backlog", "0"], "--listen-backlog must be 1-65535"),
        (["--listen-backlog", "99999999999999999999"], "--listen-backlog must be 1-65535"),  # listen() overflowed
        (["--workers", "99999999"], "--workers must be at most"),  # ran the host out of memory
        (["--host", ""], "--host must be a non-blank address"),  # "$UNSET" bound every interface
        (["--keep-alive-s", "0"], "--keep-alive-s must be a number of seconds > 0"),
        (["--keep-alive-s", "nan"], "--keep-alive-s must be a number of seconds > 0"),
        (["--port", "70000"], "--port must be 0-65535"),
        (["--drain-timeout-s", "nan"], "--drain-timeout-s must be a finite"),
        (["--drain-timeout-s", "1e300"], "--drain-timeout-s must be a finite"),
        (["--body-timeout-s", "1e300"], "--body-timeout-s must be a finite"),
        (["--log-level", "foo"], "--log-level must be one of debug, info, warning, error, critical; got 'foo'"),
        (["--admin-token", ""], "--admin-token must be a non-blank token"),  # "$UNSET": open to a bare Bearer
        (["--admin-token", "  "], "--admin-token must be a non-blank token"),
    ],
)
def test_invalid_router_settings_are_refused_up_front(flags: list[str], message: str) -> None:
    """Each of these used to start a server that loaded, failed and answered 503 for ever."""
    parser = argparse.ArgumentParser()
    RouterSettings.add_arguments(parser)
    with pytest.raises(ValueError, match=message):
        RouterSettings.from_args(parser.parse_args(flags), {})


def test_valid_router_settings_pass() -> None:
    s = RouterSettings.from_env({}, device="cuda:1", dtype="bfloat16", index_backend="torch", cache_size=0,
                                compute_threads=0, cuda_graph_seq_lens="16, 32")  # fmt: skip
    assert (s.device, s.cache_size, s.cuda_graph_seq_lens) == ("cuda:1", 0, "16, 32")


def test_serve_router_exits_2_on_an_invalid_setting(capsys: pytest.CaptureFixture[str]) -> None:
    from service.cli import main

    assert main(["serve-router", "--max-queue", "0", "--port", "0"]) == 2
    assert "--max-queue must be >= 1" in capsys.readouterr().err


def test_serve_router_exits_2_on_files_it_could_not_load(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Each used to bind, fail in the loading thread and answer 503 for ever."""
    from service.cli import main

    assert main(["serve-router", "--port", "0", "--weights", str(tmp_path / "missing.safetensors")]) == 2
    assert "--weights" in capsys.readouterr().err
    assert main(["serve-router", "--port", "0", "--model-dir", str(tmp_path)]) == 2
    assert "no model.safetensors" in capsys.readouterr().err
    not_weights = tmp_path / "passwd"
    not_weights.write_text("root:x:0:0:root:/root:/bin/bash\n")
    assert main(["serve-router", "--port", "0", "--weights", str(not_weights)]) == 2
    assert "not a readable safetensors file" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("gpus", "device", "message"),
    [(0, "cuda", "--device cuda: CUDA is not available"), (1, "cuda:1", "--device cuda:1: this host has 1 CUDA")],
)
def test_serve_router_exits_2_on_a_cuda_device_this_host_lacks(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, gpus: int, device: str, message: str
) -> None:
    """It listened, failed to load and answered 503 for ever (the host's GPUs faked: the test runs anywhere)."""
    from service.cli import main

    monkeypatch.setattr(torch.cuda, "is_available", lambda: gpus > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
    assert main(["serve-router", "--port", "0", "--device", device]) == 2
    assert message in capsys.readouterr().err


def test_invalid_dispatcher_base_settings_are_refused_up_front() -> None:
    from service.config import DispatcherSettings

    with pytest.raises(ValueError) as info:
        DispatcherSettings.from_env({}, workers=0, port=-1)
    assert str(info.value) == "--port must be 0-65535; --workers must be >= 1"


@pytest.mark.parametrize(
    "flags",
    [
        ["--assignment-ttl-s", "nan"],  # every route a 500
        ["--assignment-ttl-s", "inf"],
        ["--assignment-ttl-s", "-100"],  # every assignment expired on issue
        ["--request-ttl-s", "-1"],  # loads given back at once
        ["--load-window-s", "0"],  # a ZeroDivisionError killed the refresh loop for good
        ["--autoscale-interval-s", "0"],  # the refresh loop spun a core
        ["--heartbeat-timeout-s", "nan"],
        ["--max-cost", "nan"],  # every route refused "between 0 and nan"
        ["--max-report-value", "0"],
        ["--redis-timeout-s", "inf"],
        ["--log-level", "loud"],  # a traceback once logging was configured
        ["--released-retry-s", "0"],
        ["--request-ttl-s", "1e16"],  # Redis refused the idempotency keys' expiry: every keyed route a 503
        ["--load-window-s", "1200"],  # past the 600 s of load history kept: the rate read half the load
        ["--admin-token", ""],
        ["--max-workers-per-endpoint", "0"],
        ["--max-open-requests", "0"],  # every new route refused
        ["--assignment-ttl-s", "1e300"],  # its expiry past a 64-bit integer: every route a 500
        ["--heartbeat-timeout-s", "1e300"],
        ["--autoscale-interval-s", "0.001"],  # 1e-9 spun a core
        ["--redis-timeout-s", "1e-300"],
        ["--signing-key-file", "k", "--signing-key", "00"],  # the file won, wherever each came from
        ["--host", " "],
        ["--max-unauthenticated-body-bytes", "100", "--max-body-bytes", "1000"],  # no largest body would fit
        ["--max-unauthenticated-body-bytes", "64001", "--max-body-bytes", "1000"],  # over the whole budget (64 bodies)
        ["--max-unauthenticated-body-bytes", "5000", "--max-buffered-body-bytes", "4000", "--max-body-bytes", "1000"],
    ],
)
def test_invalid_dispatcher_settings_are_refused_up_front(flags: list[str]) -> None:
    from service.config import DispatcherSettings

    parser = argparse.ArgumentParser()
    DispatcherSettings.add_arguments(parser)
    with pytest.raises(ValueError, match=f"^{flags[0]} must be "):
        DispatcherSettings.from_args(parser.parse_args(flags), {})


def test_the_unauthenticated_body_budget_is_a_share_of_the_whole() -> None:
    from service.config import DispatcherSettings

    env = {"LLMROUTER_MAX_UNAUTHENTICATED_BODY_BYTES": "64000", "LLMROUTER_MAX_BODY_BYTES": "1000"}
    assert DispatcherSettings.from_env(env).max_unauthenticated_body_bytes == 64000  # all of it: no split
    assert DispatcherSettings.from_env({}).max_unauthenticated_body_bytes == 0  # auto


@pytest.mark.parametrize(
    ("flags", "environ", "expected"),
    [
        ([], {}, True),
        (["--no-onednn-linear"], {}, False),
        ([], {"LLMROUTER_ONEDNN_LINEAR": "false"}, False),
        (["--onednn-linear"], {"LLMROUTER_ONEDNN_LINEAR": "false"}, True),
    ],
)
def test_the_onednn_setting_reaches_the_embedder(
    flags: list[str], environ: dict[str, str], expected: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    from service.router import app, embedder

    parser = argparse.ArgumentParser()
    RouterSettings.add_arguments(parser)
    settings = RouterSettings.from_args(parser.parse_args(flags), environ)
    seen: dict[str, object] = {}
    monkeypatch.setattr(embedder, "MiniLMEmbedder", lambda **kwargs: seen.update(kwargs))
    app.build_embedder(settings)
    assert seen["onednn"] is expected and seen["torchscript"] is True


@pytest.mark.parametrize(
    ("flags", "environ", "expected"),
    [
        ([], {}, True),
        (["--no-batch-signatures"], {}, False),
        ([], {"LLMROUTER_BATCH_SIGNATURES": "false"}, False),
        (["--batch-signatures"], {"LLMROUTER_BATCH_SIGNATURES": "false"}, True),
    ],
)
def test_the_batch_signatures_setting_reaches_the_signer(
    flags: list[str], environ: dict[str, str], expected: bool
) -> None:
    from service.config import DispatcherSettings
    from service.dispatch.app import DispatcherService

    parser = argparse.ArgumentParser()
    DispatcherSettings.add_arguments(parser)
    service = DispatcherService(DispatcherSettings.from_args(parser.parse_args(flags), environ))
    assert service.signing.max_leaves == (MAX_BATCH_LEAVES if expected else 1)

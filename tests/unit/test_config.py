from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from service.config import RouterSettings, settings_summary


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


def test_summary_masks_secrets() -> None:
    s = RouterSettings.from_env({"LLMROUTER_ADMIN_TOKEN": "sekrit"})
    assert settings_summary(s)["admin_token"] == "***"
    assert "sekrit" not in repr(settings_summary(s))


def test_default_weights_path_is_the_shipped_file() -> None:
    assert RouterSettings.from_env({}).resolved_weights().name.endswith(".safetensors")

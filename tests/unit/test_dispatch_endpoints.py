"""Endpoint settings and credentials: validation, the TOML file, key checks."""

from __future__ import annotations

import hashlib
import re
import stat
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from service.dispatch.endpoints import (
    ConfigError,
    EndpointRegistry,
    EndpointSpec,
    add_key,
    hash_key,
    load_config,
    new_key,
    parse_config,
    save_config,
    update_config,
    with_endpoint,
)

API_A, WORKER_A = "dk_client-a", "wt_worker-a"
API_B, WORKER_B = "dk_client-b", "wt_worker-b"
DIGEST = "ab" * 32


@pytest.fixture
def registry() -> EndpointRegistry:
    a = EndpointSpec("ep-a", api_key_sha256=(hash_key(API_A),), worker_token_sha256=(hash_key(WORKER_A),))
    b = EndpointSpec("ep-b", api_key_sha256=(hash_key(API_B),), worker_token_sha256=(hash_key(WORKER_B),))
    return EndpointRegistry({"ep-a": a, "ep-b": b})


# -- validation -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["gpt-4o", "a", "A.b_c:d-e", "9", "x" * 128])
def test_good_names(name: str) -> None:
    assert EndpointSpec(name).name == name


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"name": ""}, "name"),
        ({"name": "-leading-dash"}, "name"),
        ({"name": "has/slash"}, "name"),
        ({"name": "has space"}, "name"),
        ({"name": "trailing-newline\n"}, "name"),
        ({"name": "x" * 129}, "name"),
        ({"name": "caf\u00e9"}, "name"),
        ({"api_key_sha256": ("AB" * 32,)}, "digests"),
        ({"api_key_sha256": ("ab" * 31,)}, "digests"),
        ({"worker_token_sha256": (DIGEST, "not-a-digest")}, "digests"),
        ({"target_util": 0.0}, "target_util"),
        ({"target_util": 1.01}, "target_util"),
        ({"target_util": -0.5}, "target_util"),
        ({"max_queue_time_s": 0.0}, "max_queue_time_s"),
        ({"max_queue_time_s": float("nan")}, "max_queue_time_s"),
        ({"max_queue_time_s": float("inf")}, "max_queue_time_s"),  # add-endpoint wrote it; the loader refused the file
        ({"min_workers": 3, "max_workers": 2}, "min_workers"),
        ({"min_workers": -1}, "min_workers"),
        ({"cold_workers": -1}, "cold_workers"),
    ],
)
def test_spec_validation(fields: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        EndpointSpec(**{"name": "ep", **fields})


def test_spec_boundaries_are_accepted() -> None:
    spec = EndpointSpec("ep", target_util=1.0, min_workers=4, max_workers=4, cold_workers=0, max_queue_time_s=0.001)
    assert (spec.target_util, spec.min_workers, spec.max_workers) == (1.0, 4, 4)


# -- the file ---------------------------------------------------------------------------------------------------
def test_parse_config_builds_specs() -> None:
    registry = parse_config(
        {"endpoints": {"ep": {"api_key_sha256": [DIGEST], "max_workers": 4, "target_util": 0.5, "cold_workers": 1}}}
    )
    spec = registry.get("ep")
    assert spec == EndpointSpec("ep", api_key_sha256=(DIGEST,), max_workers=4, target_util=0.5, cold_workers=1)
    assert len(registry) == 1
    assert registry.get("other") is None
    assert len(parse_config({})) == 0


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"endpoints": {"ep": {"max_worker": 4}}}, "unknown keys.*max_worker"),
        ({"endpoints": {"ep": {"api_key": "x"}}}, "unknown keys"),
        ({"endpoints": ["ep"]}, "table of endpoint tables"),
        ({"endpoints": "ep"}, "table of endpoint tables"),
        ({"endpoints": {"ep": "not a table"}}, r"\[endpoints.ep\] must be a table"),
        ({"endpoints": {"ep": {"max_workers": "16"}}}, "ep"),
        ({"endpoints": {"bad name": {}}}, "bad name"),
        ({"endpoints": {"ep": {"api_key_sha256": ["short"]}}}, "digests"),
        ({"endpoints": {"ep": {"target_util": 10**400}}}, "target_util must be a finite number"),  # OverflowError
        ({"endpoints": {"ep": {"max_queue_time_s": -(10**309)}}}, "max_queue_time_s must be a finite number"),
    ],
)
def test_parse_config_errors(data: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_config(data)


def test_save_then_load_round_trips(tmp_path: Path, registry: EndpointRegistry) -> None:
    tuned = EndpointSpec(
        "tuned",
        api_key_sha256=(DIGEST, "cd" * 32),
        max_queue_time_s=2.5,
        target_util=0.75,
        min_workers=1,
        max_workers=3,
        cold_workers=2,
    )
    registry = with_endpoint(registry, tuned)
    path = tmp_path / "endpoints.toml"
    save_config(path, registry)
    assert load_config(path) == registry
    assert "[endpoints.tuned]" in path.read_text()
    assert API_A not in path.read_text()  # hashes only
    assert sorted(p.name for p in tmp_path.iterdir()) == ["endpoints.toml"]  # no temporary file left behind
    save_config(path, EndpointRegistry())
    assert len(load_config(path)) == 0


def test_save_keeps_the_files_comments_and_layout(tmp_path: Path) -> None:
    """add-endpoint and add-key rewrite the file: an operator's comments and the order of the tables survive (they
    were dropped), and only what changed is rewritten."""
    path = tmp_path / "endpoints.toml"
    path.write_text(
        "# Production endpoints: ask #llm-infra before removing one.\n"
        "[endpoints.zeta]  # the big model\n"
        f'api_key_sha256 = ["{DIGEST}"]  # rotated 2026-11\n'
        "max_workers = 4\n",
        encoding="utf-8",
    )
    registry = load_config(path)
    zeta = registry.endpoints["zeta"]
    registry = with_endpoint(registry, EndpointSpec("alpha", api_key_sha256=("cd" * 32,)))
    save_config(path, registry)
    text = path.read_text()
    assert text.startswith("# Production endpoints: ask #llm-infra before removing one.\n[endpoints.zeta]  # the big")
    assert f'api_key_sha256 = ["{DIGEST}"]  # rotated 2026-11' in text  # unchanged: its comment kept
    assert text.index("[endpoints.zeta]") < text.index("[endpoints.alpha]")  # the file's order, new tables last
    assert load_config(path) == registry
    save_config(path, with_endpoint(registry, add_key(zeta, kind="worker", key="wt_new")))
    assert load_config(path).endpoints["zeta"].worker_token_sha256 == (hash_key("wt_new"),)
    assert "# Production endpoints" in path.read_text()
    save_config(path, EndpointRegistry({"alpha": registry.endpoints["alpha"]}))
    assert "[endpoints.zeta]" not in path.read_text() and set(load_config(path).endpoints) == {"alpha"}


def test_save_refuses_to_overwrite_a_file_it_cannot_parse(tmp_path: Path, registry: EndpointRegistry) -> None:
    path = tmp_path / "endpoints.toml"
    path.write_text("[endpoints.a\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="cannot update"):
        save_config(path, registry)
    assert path.read_text() == "[endpoints.a\n"


def test_load_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[endpoints.ep\nmax_workers = 1\n")
    with pytest.raises(ConfigError, match=r"bad\.toml"):
        load_config(bad)
    latin1 = tmp_path / "latin1.toml"
    latin1.write_bytes("# caf\u00e9\n".encode("latin-1"))
    with pytest.raises(ConfigError, match=r"latin1\.toml: not a UTF-8 text file"):
        load_config(latin1)
    deep = tmp_path / "deep.toml"
    deep.write_text("x = " + "[" * 5000 + "]" * 5000 + "\n")  # tomllib recurses: RecursionError
    with pytest.raises(ConfigError, match=r"deep\.toml: nested too deeply"):
        load_config(deep)


def test_save_keeps_the_files_mode_and_edits_a_symlinks_target(tmp_path: Path, registry: EndpointRegistry) -> None:
    """The write-then-rename came back 0644 for a 0600 file, and replaced a symlink by a file of its own."""
    real = tmp_path / "real.toml"
    save_config(real, EndpointRegistry())
    real.chmod(0o600)
    link = tmp_path / "endpoints.toml"
    link.symlink_to(real)
    save_config(link, registry)
    assert link.is_symlink() and stat.S_IMODE(real.stat().st_mode) == 0o600
    assert set(load_config(real).endpoints) == set(registry.endpoints)


# -- credentials ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "text",
    [
        # dotted keys: the new [endpoints.newep] table came before a's second key, which then belonged to newep
        f'endpoints.a.max_workers = 3\nendpoints.a.api_key_sha256 = ["{DIGEST}"]\n',
        "endpoints = { a = { max_workers = 3 } }\n",  # an inline table cannot take a table: tomlkit raised
    ],
)
def test_a_layout_the_edit_cannot_keep_is_refused_and_the_file_left_alone(tmp_path: Path, text: str) -> None:
    path = tmp_path / "endpoints.toml"
    path.write_text(text, encoding="utf-8")
    before = load_config(path)
    with pytest.raises(ConfigError, match="cannot update"):
        save_config(path, with_endpoint(before, EndpointSpec("newep", api_key_sha256=(DIGEST,))))
    assert path.read_text(encoding="utf-8") == text and load_config(path) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["endpoints.toml"]  # no temporary file left behind


def test_concurrent_updates_each_keep_their_change(tmp_path: Path) -> None:
    """Parallel add-key runs shared one temporary name and read before the others wrote: keys were printed, then
    lost, and some runs failed on a vanished temporary file."""
    path = tmp_path / "endpoints.toml"
    update_config(path, lambda r: with_endpoint(r, EndpointSpec("ep")))
    digests = [hashlib.sha256(str(i).encode()).hexdigest() for i in range(24)]

    def add(digest: str) -> None:
        def change(registry: EndpointRegistry) -> EndpointRegistry:
            spec = registry.get("ep")
            assert spec is not None
            time.sleep(0.002)  # widen the read-modify-write window
            return with_endpoint(registry, replace(spec, api_key_sha256=(*spec.api_key_sha256, digest)))

        update_config(path, change)

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(add, digests))
    spec = load_config(path).get("ep")
    assert spec is not None and sorted(spec.api_key_sha256) == sorted(digests)


def test_worker_counts_are_bounded() -> None:
    with pytest.raises(ConfigError, match="max_workers <= 1000000"):
        parse_config({"endpoints": {"ep": {"max_workers": 10**21}}})
    with pytest.raises(ConfigError, match="cold_workers must be from 0 to 1000000"):
        parse_config({"endpoints": {"ep": {"cold_workers": 10**7}}})


def test_hash_key_is_sha256_hex() -> None:
    assert hash_key("secret") == hashlib.sha256(b"secret").hexdigest()


def test_the_right_keys_open_their_endpoint(registry: EndpointRegistry) -> None:
    assert registry.authenticate_client("ep-a", API_A) is registry.get("ep-a")
    assert registry.authenticate_worker("ep-a", WORKER_A) is registry.get("ep-a")
    assert registry.authenticate_client("ep-b", API_B) is registry.get("ep-b")


@pytest.mark.parametrize(
    ("name", "key"),
    [
        ("ep-a", "dk_wrong"),
        ("ep-a", ""),
        ("ep-a", API_A + " "),
        ("ep-a", API_B),  # a key of endpoint B does not open A
        ("ep-b", API_A),
        ("no-such-endpoint", API_A),
        ("no-such-endpoint", ""),
    ],
)
def test_wrong_keys_and_unknown_endpoints_are_none(registry: EndpointRegistry, name: str, key: str) -> None:
    assert registry.authenticate_client(name, key) is None


def test_worker_tokens_and_api_keys_are_not_interchangeable(registry: EndpointRegistry) -> None:
    assert registry.authenticate_client("ep-a", WORKER_A) is None
    assert registry.authenticate_worker("ep-a", API_A) is None
    assert registry.authenticate_worker("ep-a", WORKER_B) is None
    assert registry.authenticate_worker("no-such-endpoint", WORKER_A) is None
    assert registry.authenticate_client("ep-a", API_A) is registry.authenticate_worker("ep-a", WORKER_A) is not None


def test_an_endpoint_without_keys_accepts_nothing() -> None:
    registry = EndpointRegistry({"open": EndpointSpec("open")})
    assert registry.authenticate_client("open", "") is None
    assert registry.authenticate_client("open", "no such endpoint") is None  # the dummy digest's preimage
    assert registry.authenticate_worker("open", "anything") is None


def test_add_key_adds_a_second_valid_key(registry: EndpointRegistry) -> None:
    spec = registry.get("ep-a")
    assert spec is not None
    second_api, second_worker = new_key("dk"), new_key("wt")
    spec = add_key(add_key(spec, kind="api", key=second_api), kind="worker", key=second_worker)
    assert spec.api_key_sha256 == (hash_key(API_A), hash_key(second_api))
    assert spec.worker_token_sha256 == (hash_key(WORKER_A), hash_key(second_worker))
    updated = with_endpoint(registry, spec)
    for key in (API_A, second_api):
        assert updated.authenticate_client("ep-a", key) == spec
    for token in (WORKER_A, second_worker):
        assert updated.authenticate_worker("ep-a", token) == spec
    assert updated.authenticate_client("ep-a", second_worker) is None
    assert registry.authenticate_client("ep-a", second_api) is None  # the original registry is unchanged
    with pytest.raises(ValueError, match="kind"):
        add_key(spec, kind="admin", key="x")


def test_new_key_prefix_and_uniqueness() -> None:
    keys = {new_key("dk") for _ in range(200)}
    assert len(keys) == 200
    for key in keys:
        assert re.fullmatch(r"dk_[A-Za-z0-9_-]{43}", key), key
    assert new_key("wt").startswith("wt_")

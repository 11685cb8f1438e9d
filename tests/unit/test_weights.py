from __future__ import annotations

import dataclasses
import json
import stat
import tracemalloc
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from safetensors.numpy import save_file

from service.router import weights as weights_module
from service.router.weights import (
    FORMAT,
    FORMAT_VERSION,
    RouterWeights,
    WeightsError,
    default_weights_path,
    load_weights,
    save_weights,
)

OFFICIAL_EMBEDDER_SHA256 = "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"
TOY_SHA256 = "ab" * 32


def toy_weights(num_models: int = 3, k: int = 4, dim: int = 8, seed: int = 0) -> RouterWeights:
    rng = np.random.default_rng(seed)
    centroids = rng.normal(size=(k, dim))
    centroids /= np.linalg.norm(centroids, axis=1, keepdims=True)
    return RouterWeights(
        models=tuple(f"model-{i}" for i in range(num_models)),
        centroids=centroids.astype(np.float32),
        expected_error=rng.uniform(size=(num_models, k)).astype(np.float32),
        cost_per_1k=np.linspace(0.1, 1.0, num_models, dtype=np.float32),
        default_lambda=0.1,
        embedder_id="sentence-transformers/all-MiniLM-L6-v2",
        embedder_sha256=TOY_SHA256,
        metadata={"cost_unit": "relative", "note": [1, 2, 3]},
    )


def with_changes(weights: RouterWeights, **changes: Any) -> RouterWeights:
    return dataclasses.replace(weights, **changes)


def test_round_trip_keeps_every_field(tmp_path: Path) -> None:
    weights = toy_weights()
    path = tmp_path / "sub" / "w.safetensors"
    save_weights(weights, path)
    loaded = load_weights(path)
    assert loaded.models == weights.models
    np.testing.assert_array_equal(loaded.centroids, weights.centroids)
    np.testing.assert_array_equal(loaded.expected_error, weights.expected_error)
    np.testing.assert_array_equal(loaded.cost_per_1k, weights.cost_per_1k)
    assert loaded.default_lambda == weights.default_lambda
    assert loaded.embedder_id == weights.embedder_id
    assert loaded.embedder_sha256 == weights.embedder_sha256
    assert dict(loaded.metadata) == weights.metadata
    assert loaded.version == weights.version
    assert (loaded.num_models, loaded.num_clusters, loaded.dim) == (3, 4, 8)


def test_save_is_atomic_and_readable(tmp_path: Path) -> None:
    path = tmp_path / "w.safetensors"
    save_weights(toy_weights(seed=1), path)
    save_weights(toy_weights(seed=2), path)  # overwrite in place
    assert load_weights(path).version == toy_weights(seed=2).version
    assert [p.name for p in tmp_path.iterdir()] == ["w.safetensors"]  # no temp file left behind
    assert path.stat().st_mode & stat.S_IROTH


def test_save_refuses_invalid_weights_and_leaves_no_file(tmp_path: Path) -> None:
    path = tmp_path / "w.safetensors"
    bad = with_changes(toy_weights(), cost_per_1k=np.array([-1.0, 0.0, 1.0], dtype=np.float32))
    with pytest.raises(WeightsError, match="cost_per_1k"):
        save_weights(bad, path)
    assert not path.exists()


def test_version_is_stable_and_ignores_metadata() -> None:
    weights = toy_weights()
    assert weights.version == toy_weights().version
    assert weights.version.startswith(f"v{FORMAT_VERSION}-")
    assert len(weights.version) == len("v1-") + 12
    assert with_changes(weights, metadata={"created_at": "other"}).version == weights.version


@pytest.mark.parametrize(
    "change",
    [
        lambda w: {"expected_error": w.expected_error + np.float32(1e-3)},
        lambda w: {"centroids": w.centroids[::-1].copy()},
        lambda w: {"cost_per_1k": w.cost_per_1k * 2},
        lambda w: {"default_lambda": 0.2},
        lambda w: {"models": ("a", "b", "c")},
        lambda w: {"embedder_sha256": "cd" * 32},
        lambda w: {"embedder_id": "other"},
    ],
)
def test_version_changes_with_content(change: Any) -> None:
    weights = toy_weights()
    assert with_changes(weights, **change(weights)).version != weights.version


def _nan_at_first(array: np.ndarray) -> np.ndarray:
    out = array.copy()
    out.flat[0] = np.nan
    return out


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda w: {"centroids": w.centroids[:, :, None]}, "centroids must have 2 dimension"),
        (lambda w: {"centroids": np.zeros((0, 8), dtype=np.float32)}, "K >= 1"),
        (lambda w: {"expected_error": w.expected_error[:, :3]}, r"expected_error must be M x K = \(3, 4\)"),
        (lambda w: {"expected_error": w.expected_error.T.copy()}, "expected_error must be M x K"),
        (lambda w: {"cost_per_1k": w.cost_per_1k[:2]}, r"cost_per_1k must have shape \(3,\)"),
        (lambda w: {"cost_per_1k": w.cost_per_1k.astype(np.float64)}, "cost_per_1k must be float32"),
        (lambda w: {"expected_error": w.expected_error.tolist()}, "must be a numpy array"),
        (lambda w: {"centroids": _nan_at_first(w.centroids)}, "centroids has 1 non-finite"),
        (lambda w: {"expected_error": _nan_at_first(w.expected_error)}, "expected_error has 1 non-finite"),
        (lambda w: {"cost_per_1k": np.array([np.inf, 0, 0], dtype=np.float32)}, "cost_per_1k has 1 non-finite"),
        (lambda w: {"expected_error": w.expected_error + 1.5}, r"expected_error must lie in \[0.0, 1.0\]"),
        (lambda w: {"expected_error": w.expected_error - 1.5}, r"expected_error must lie in \[0.0, 1.0\]"),
        (lambda w: {"cost_per_1k": np.array([0.5, -0.1, 1], dtype=np.float32)}, "cost_per_1k must lie in"),
        (lambda w: {"models": ("a", "b", "a")}, "duplicate model names: a"),
        (lambda w: {"models": ("a", "", "c")}, "non-empty strings"),
        (lambda w: {"models": ("a", "b ", "c")}, "must not start or end with whitespace"),
        (lambda w: {"models": tuple(f"m{i}" for i in range(10_001))}, "10001 models; at most 10000"),
        (lambda w: {"models": ()}, "non-empty tuple"),
        (lambda w: {"models": ["a", "b", "c"]}, "non-empty tuple"),
        (lambda w: {"centroids": w.centroids * 2}, "centroids must be L2-normalised"),
        (lambda w: {"default_lambda": -0.1}, "default_lambda must be a number from 0 to 1e"),
        (lambda w: {"default_lambda": float("nan")}, "default_lambda must be a number from 0 to 1e"),
        # lambda * cost overflowed to inf, which answers carried as null scores
        (lambda w: {"default_lambda": 1e308}, "default_lambda must be a number from 0 to 1e"),
        (lambda w: {"cost_per_1k": np.array([0.5, 2e9, 1], dtype=np.float32)}, "cost_per_1k must lie in"),
        (lambda w: {"default_lambda": True}, "default_lambda must be a number"),
        (lambda w: {"embedder_id": ""}, "embedder_id"),
        (lambda w: {"embedder_sha256": "xyz"}, "embedder_sha256 must be 64 lowercase hex"),
        (lambda w: {"metadata": {"bad": float("nan")}}, "JSON-serialisable"),
        (lambda w: {"metadata": {"bad": object()}}, "JSON-serialisable"),
    ],
)
def test_validate_rejects(change: Any, message: str) -> None:
    weights = toy_weights()
    with pytest.raises(WeightsError, match=message):
        with_changes(weights, **change(weights)).validate()


def test_validate_accepts_boundaries() -> None:
    weights = toy_weights()
    edge = with_changes(
        weights,
        expected_error=np.zeros_like(weights.expected_error),
        cost_per_1k=np.zeros_like(weights.cost_per_1k),
        default_lambda=0.0,
    )
    edge.validate()
    with_changes(weights, expected_error=np.ones_like(weights.expected_error)).validate()


def _write_raw(path: Path, header: dict[str, str], tensors: dict[str, np.ndarray] | None = None) -> None:
    weights = toy_weights()
    if tensors is None:
        tensors = {"centroids": weights.centroids, "expected_error": weights.expected_error}
        tensors["cost_per_1k"] = weights.cost_per_1k
    save_file(tensors, str(path), metadata=header)


def _valid_header() -> dict[str, str]:
    weights = toy_weights()
    return {
        "format": FORMAT,
        "format_version": str(FORMAT_VERSION),
        "models": json.dumps(list(weights.models)),
        "default_lambda": "0.1",
        "embedder_id": weights.embedder_id,
        "embedder_sha256": weights.embedder_sha256,
        "metadata": "{}",
    }


def test_raw_header_helper_is_valid(tmp_path: Path) -> None:
    path = tmp_path / "ok.safetensors"
    _write_raw(path, _valid_header())
    assert load_weights(path).models == toy_weights().models


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        ({"format": "something-else"}, "format is 'something-else', expected 'llm-router-weights'"),
        ({"format_version": "2"}, "format_version is '2'; this code reads version 1"),
        ({"metadata": "{not json"}, "'metadata' is not valid JSON"),
        ({"models": '"just-a-string"'}, "models must be a JSON list"),
        ({"models": '["a", "a", "b"]'}, "duplicate model names"),
        ({"default_lambda": '"high"'}, "default_lambda must be a JSON number"),
        # what Python's json trips on past its limits: a bad file, never an exception a reload answers 500 for
        ({"metadata": "[" * 100_000 + "]" * 100_000}, "'metadata' is not usable JSON \\(RecursionError"),
        ({"default_lambda": "1" + "0" * 5000}, "'default_lambda' is not usable JSON \\(ValueError"),
    ],
)
def test_load_rejects_bad_header(tmp_path: Path, edit: dict[str, str], message: str) -> None:
    path = tmp_path / "bad.safetensors"
    _write_raw(path, {**_valid_header(), **edit})
    with pytest.raises(WeightsError, match=message) as info:
        load_weights(path)
    assert str(path) in str(info.value)


def test_load_rejects_missing_metadata_key(tmp_path: Path) -> None:
    header = _valid_header()
    del header["embedder_sha256"]
    path = tmp_path / "bad.safetensors"
    _write_raw(path, header)
    with pytest.raises(WeightsError, match="metadata lacks embedder_sha256"):
        load_weights(path)


def test_load_rejects_missing_tensor(tmp_path: Path) -> None:
    weights = toy_weights()
    path = tmp_path / "bad.safetensors"
    _write_raw(path, _valid_header(), {"centroids": weights.centroids, "expected_error": weights.expected_error})
    with pytest.raises(WeightsError, match="tensors are"):
        load_weights(path)


def test_load_rejects_plain_safetensors_without_our_metadata(tmp_path: Path) -> None:
    path = tmp_path / "plain.safetensors"
    save_file({"x": np.zeros(3, dtype=np.float32)}, str(path))
    with pytest.raises(WeightsError, match="format is None"):
        load_weights(path)


def test_load_rejects_truncated_file(tmp_path: Path) -> None:
    path = tmp_path / "w.safetensors"
    save_weights(toy_weights(), path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(WeightsError, match="not a readable safetensors file") as info:
        load_weights(path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize("content", [b"", b"garbage", b"\xff" * 64])
def test_load_rejects_garbage(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "garbage.safetensors"
    path.write_bytes(content)
    with pytest.raises(WeightsError, match="not a readable safetensors file"):
        load_weights(path)


def test_load_missing_file_names_it(tmp_path: Path) -> None:
    path = tmp_path / "nope.safetensors"
    with pytest.raises(WeightsError, match="no such weights file") as info:
        load_weights(path)
    assert str(path) in str(info.value)


def test_load_directory_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(WeightsError, match="a folder, not a weights file"):
        load_weights(tmp_path)


@pytest.mark.parametrize("name", ["a" * 300 + ".safetensors", "x" * 5000])
def test_load_path_the_os_refuses_is_a_weights_error(tmp_path: Path, name: str) -> None:
    """ENAMETOOLONG from the file system must come out as a rejected file (400 on /admin/reload), not a crash."""
    with pytest.raises(WeightsError, match="cannot read this path"):
        load_weights(tmp_path / name)


def test_default_weights_path() -> None:
    path = default_weights_path()
    assert path.name == "routerbench-k100.safetensors"
    assert path.parent.name == "default_weights"
    assert path.parent.parent.name == "router"


def test_shipped_default_weights_load() -> None:
    weights = load_weights(default_weights_path())
    assert weights.num_clusters == 100
    assert weights.dim == 384
    assert weights.num_models == 11
    assert list(weights.models) == sorted(weights.models)
    assert weights.embedder_id == "sentence-transformers/all-MiniLM-L6-v2"
    assert weights.embedder_sha256 == OFFICIAL_EMBEDDER_SHA256
    assert float(weights.cost_per_1k.max()) == pytest.approx(1.0)
    meta = weights.metadata
    assert meta["cost_unit"].startswith("relative blended list price")
    assert set(meta["price_usd_per_1k"]) == set(weights.models)
    assert meta["fit"]["clusters"] == 100
    assert meta["fit"]["text_mode"] == "last_block"
    assert [f["rows"] for f in meta["training_data"]["files"]] == [1039, 299, 887]
    assert meta["training_data"]["rows_used"] == 2225
    assert all(len(f["sha256"]) == 64 for f in meta["training_data"]["files"])
    assert sum(meta["fit"]["cluster_sizes"]) == 2225
    assert "created_at" in meta
    assert meta["tool"]["name"] == "service.router.offline.fit"


def test_load_turns_any_parser_failure_into_a_weights_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "w.safetensors"
    _write_raw(path, _valid_header())

    def trips(*args: Any) -> None:
        raise IndexError("x" * 1000)

    monkeypatch.setattr(weights_module, "_from_parts", trips)
    with pytest.raises(WeightsError, match=r"malformed weights file \(IndexError: x{200}\.\.\.\)$") as info:
        load_weights(path)
    assert str(path) in str(info.value)


def _sparse_safetensors(path: Path, header: dict[str, str] | None, tensors: dict[str, list[int]]) -> None:
    """A safetensors file whose tensors are declared but never written: a sparse file, GBs long, KBs on disk."""
    layout: dict[str, Any] = {} if header is None else {"__metadata__": header}
    offset = 0
    for name, shape in tensors.items():
        size = 4 * int(np.prod(shape))
        layout[name] = {"dtype": "F32", "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(layout).encode()
    text += b" " * (-len(text) % 8)
    with path.open("wb") as fh:
        fh.write(len(text).to_bytes(8, "little") + text)
        fh.truncate(8 + len(text) + offset)


def _load_refused_within(path: Path, message: str, max_mib: float = 64) -> None:
    """``load_weights`` refuses ``path`` with ``message``, allocating under ``max_mib`` on the way."""
    tracemalloc.start()
    try:
        with pytest.raises(WeightsError, match=message):
            load_weights(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < max_mib * 2**20, f"{peak / 2**20:.0f} MiB allocated"


def test_another_safetensors_file_is_refused_before_its_tensors_are_read(tmp_path: Path) -> None:
    """/admin/reload of any large safetensors file on the host (an LLM's weights) loaded every tensor, GBs, before
    finding it was no router weights file."""
    path = tmp_path / "llm.safetensors"
    _sparse_safetensors(path, None, {"model.embed_tokens.weight": [1 << 20, 1 << 10]})  # 4 GiB declared
    _load_refused_within(path, "format is None, expected 'llm-router-weights'")


def test_router_weights_with_a_huge_tensor_are_refused_before_it_is_read(tmp_path: Path) -> None:
    path = tmp_path / "huge.safetensors"
    shapes = {"centroids": [1 << 20, 1 << 10], "expected_error": [3, 4], "cost_per_1k": [3]}
    _sparse_safetensors(path, _valid_header(), shapes)
    _load_refused_within(path, "tensor 'centroids' of shape \\[1048576, 1024\\] is far larger")

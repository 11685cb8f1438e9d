"""The router's weights file: one safetensors file, three tensors and string metadata.

Layout (format ``llm-router-weights``, version 1):

- tensors: ``centroids`` ``[K, D]`` float32 (unit rows), ``expected_error`` ``[M, K]`` float32 in
  ``[0, 1]``, ``cost_per_1k`` ``[M]`` float32 in ``[0, MAX_COST_PER_1K]``;
- ``__metadata__`` (strings only, as safetensors requires): ``format``, ``format_version``, and
  JSON-encoded ``models``, ``default_lambda`` (in ``[0, MAX_COST_WEIGHT]``), ``metadata``, plus ``embedder_id`` and
  ``embedder_sha256``.

The router scores model ``m`` for a prompt in cluster ``c`` as
``expected_error[m, c] + lambda * cost_per_1k[m]`` and routes to the minimum.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import re
import tempfile
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save as safetensors_save

FORMAT = "llm-router-weights"
FORMAT_VERSION = 1

DEFAULT_WEIGHTS_DIR = "default_weights"
DEFAULT_WEIGHTS_FILE = "routerbench-k100.safetensors"

# Centroids are stored as float32; renormalising in float32 leaves ~1e-7 error, so 1e-3 only
# catches vectors that were never normalised.
UNIT_NORM_TOLERANCE = 1e-3
VERSION_HEX_CHARS = 12
# mkstemp creates 0600 files; a shipped weights file must be readable by the serving user.
WRITTEN_FILE_MODE = 0o644
# a router picks among a handful of LLMs; a file naming more is broken or hostile (validation is linear in it)
MAX_MODELS = 10_000
# Per tensor: far past any real table (MAX_MODELS x thousands of clusters), far below what would exhaust memory.
MAX_TENSOR_ELEMENTS = 1 << 26
MAX_ERROR_CHARS = 200  # of a parser's message quoted in a WeightsError
SHA256_PATTERN = re.compile(r"[0-9a-f]{64}")

# Far past "cheapest first" for any real price list, and small enough that lambda * cost_per_1k stays finite even
# in float32 (1e18): an overflow to inf would reach clients as null scores. Requests' cost_weight has the same bound.
MAX_COST_WEIGHT = 1e9
MAX_COST_PER_1K = 1e9
TENSOR_NAMES = ("centroids", "expected_error", "cost_per_1k")
_KEY_FORMAT = "format"
_KEY_FORMAT_VERSION = "format_version"
_KEY_MODELS = "models"
_KEY_DEFAULT_LAMBDA = "default_lambda"
_KEY_EMBEDDER_ID = "embedder_id"
_KEY_EMBEDDER_SHA256 = "embedder_sha256"
_KEY_METADATA = "metadata"
_REQUIRED_KEYS = (
    _KEY_FORMAT,
    _KEY_FORMAT_VERSION,
    _KEY_MODELS,
    _KEY_DEFAULT_LAMBDA,
    _KEY_EMBEDDER_ID,
    _KEY_EMBEDDER_SHA256,
    _KEY_METADATA,
)


class WeightsError(ValueError):
    """Weights that cannot be used: malformed, inconsistent, or unreadable."""


# eq=False: ndarray fields make field-wise == ambiguous; compare ``version`` instead.
@dataclass(frozen=True, eq=False)
class RouterWeights:
    models: tuple[str, ...]
    centroids: np.ndarray
    expected_error: np.ndarray
    cost_per_1k: np.ndarray
    default_lambda: float
    embedder_id: str
    embedder_sha256: str
    metadata: Mapping[str, Any] = field(default_factory=dict)

    @property
    def num_models(self) -> int:
        return len(self.models)

    @property
    def num_clusters(self) -> int:
        return int(self.centroids.shape[0])

    @property
    def dim(self) -> int:
        return int(self.centroids.shape[1])

    @functools.cached_property
    def version(self) -> str:
        """``v1-`` + 12 hex of a sha256 over everything that changes a routing decision.

        ``metadata`` (provenance, timestamps) is left out so refitting to identical numbers gives
        the same version.
        """
        digest = hashlib.sha256()
        header = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "models": list(self.models),
            "default_lambda": float(self.default_lambda),
            "embedder_id": self.embedder_id,
            "embedder_sha256": self.embedder_sha256,
            "shapes": [list(np.shape(t)) for t in self._tensors().values()],
        }
        digest.update(json.dumps(header, sort_keys=True).encode())
        for tensor in self._tensors().values():
            digest.update(np.ascontiguousarray(tensor, dtype="<f4").tobytes())
        return f"v{FORMAT_VERSION}-{digest.hexdigest()[:VERSION_HEX_CHARS]}"

    def validate(self) -> None:
        """Raise :class:`WeightsError` naming the first problem found."""
        _check_models(self.models)
        _check_tensor("centroids", self.centroids, ndim=2)
        _check_tensor("expected_error", self.expected_error, ndim=2)
        _check_tensor("cost_per_1k", self.cost_per_1k, ndim=1)
        k, d = self.centroids.shape
        m = len(self.models)
        if k < 1 or d < 1:
            raise WeightsError(f"centroids must be K x D with K >= 1 and D >= 1; got shape {self.centroids.shape}")
        if self.expected_error.shape != (m, k):
            raise WeightsError(
                f"expected_error must be M x K = ({m}, {k}) (models x clusters); got {self.expected_error.shape}"
            )
        if self.cost_per_1k.shape != (m,):
            raise WeightsError(f"cost_per_1k must have shape ({m},) (one per model); got {self.cost_per_1k.shape}")
        _check_unit_rows(self.centroids)
        _check_range("expected_error", self.expected_error, low=0.0, high=1.0)
        _check_range("cost_per_1k", self.cost_per_1k, low=0.0, high=MAX_COST_PER_1K)
        _check_lambda(self.default_lambda)
        if not isinstance(self.embedder_id, str) or not self.embedder_id.strip():
            raise WeightsError(f"embedder_id must be a non-empty string; got {self.embedder_id!r}")
        if not isinstance(self.embedder_sha256, str) or not SHA256_PATTERN.fullmatch(self.embedder_sha256):
            raise WeightsError(f"embedder_sha256 must be 64 lowercase hex characters; got {self.embedder_sha256!r}")
        _check_metadata(self.metadata)

    def _tensors(self) -> dict[str, np.ndarray]:
        return {"centroids": self.centroids, "expected_error": self.expected_error, "cost_per_1k": self.cost_per_1k}


def default_weights_path() -> Path:
    return Path(__file__).parent / DEFAULT_WEIGHTS_DIR / DEFAULT_WEIGHTS_FILE


def save_weights(weights: RouterWeights, path: Path | str) -> None:
    """Validate, then write atomically: readers see the old file or the new one, never half of one."""
    weights.validate()
    target = Path(path)
    header = {
        _KEY_FORMAT: FORMAT,
        _KEY_FORMAT_VERSION: str(FORMAT_VERSION),
        _KEY_MODELS: json.dumps(list(weights.models)),
        _KEY_DEFAULT_LAMBDA: json.dumps(float(weights.default_lambda)),
        _KEY_EMBEDDER_ID: weights.embedder_id,
        _KEY_EMBEDDER_SHA256: weights.embedder_sha256,
        _KEY_METADATA: json.dumps(dict(weights.metadata), sort_keys=True, allow_nan=False),
    }
    tensors = {name: np.ascontiguousarray(t, dtype=np.float32) for name, t in weights._tensors().items()}
    payload = safetensors_save(tensors, metadata=header)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(payload)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp_name, WRITTEN_FILE_MODE)
        os.replace(tmp_name, target)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise


def load_weights(path: Path | str) -> RouterWeights:
    """Read and validate; every problem becomes a :class:`WeightsError` that names the file."""
    source = Path(path)
    try:
        header, tensors = _read_safetensors(source)
        weights = _from_parts(header, tensors)
        weights.validate()
    except WeightsError as exc:
        raise WeightsError(f"{source}: {exc}") from exc
    except Exception as exc:  # a file is untrusted input: whatever it trips in a parser is a bad file, never a 500
        raise WeightsError(f"{source}: malformed weights file ({type(exc).__name__}: {_short(exc)})") from exc
    return weights


def _short(exc: Exception) -> str:
    text = str(exc)
    return text if len(text) <= MAX_ERROR_CHARS else text[:MAX_ERROR_CHARS] + "..."


def _read_safetensors(path: Path) -> tuple[dict[str, str], dict[str, np.ndarray]]:
    try:  # a path the OS refuses to look at (too long, a component not a folder) is a bad path, not a crash
        is_file = path.is_file()
    except OSError as exc:
        raise WeightsError(f"cannot read this path ({exc.strerror or exc})") from exc
    if not is_file:
        raise WeightsError("no such weights file" if not path.is_dir() else "a folder, not a weights file")
    try:
        with safe_open(str(path), framework="numpy") as fh:
            header = dict(fh.metadata() or {})
            names = list(fh.keys())
            # Checked before any tensor is read: any other safetensors file (an LLM's, GBs) was loaded whole first.
            _check_layout(header, names)
            for name in names:
                shape = fh.get_slice(name).get_shape()
                if math.prod(shape) > MAX_TENSOR_ELEMENTS:
                    raise WeightsError(f"tensor {name!r} of shape {list(shape)} is far larger than router weights")
            tensors = {name: fh.get_tensor(name) for name in names}
    except WeightsError:
        raise
    except (SafetensorError, OSError, ValueError) as exc:
        raise WeightsError(f"not a readable safetensors file ({exc})") from exc
    return header, tensors


def _check_layout(header: Mapping[str, str], tensor_names: list[str]) -> None:
    found_format = header.get(_KEY_FORMAT)
    if found_format != FORMAT:
        raise WeightsError(f"format is {found_format!r}, expected {FORMAT!r}")
    found_version = header.get(_KEY_FORMAT_VERSION)
    if found_version != str(FORMAT_VERSION):
        raise WeightsError(f"format_version is {found_version!r}; this code reads version {FORMAT_VERSION}")
    missing = [key for key in _REQUIRED_KEYS if key not in header]
    if missing:
        raise WeightsError(f"metadata lacks {', '.join(missing)}")
    if set(tensor_names) != set(TENSOR_NAMES):
        raise WeightsError(f"tensors are {sorted(tensor_names)}, expected {sorted(TENSOR_NAMES)}")


def _from_parts(header: Mapping[str, str], tensors: Mapping[str, np.ndarray]) -> RouterWeights:
    """From what ``_read_safetensors`` read, its layout already checked."""
    models = _json_field(header, _KEY_MODELS)
    if not isinstance(models, list):
        raise WeightsError(f"models must be a JSON list; got {type(models).__name__}")
    default_lambda = _json_field(header, _KEY_DEFAULT_LAMBDA)
    if isinstance(default_lambda, bool) or not isinstance(default_lambda, int | float):
        raise WeightsError(f"default_lambda must be a JSON number; got {default_lambda!r}")
    metadata = _json_field(header, _KEY_METADATA)
    return RouterWeights(
        models=tuple(models),
        centroids=tensors["centroids"],
        expected_error=tensors["expected_error"],
        cost_per_1k=tensors["cost_per_1k"],
        default_lambda=float(default_lambda),
        embedder_id=header[_KEY_EMBEDDER_ID],
        embedder_sha256=header[_KEY_EMBEDDER_SHA256],
        metadata=metadata,
    )


def _json_field(header: Mapping[str, str], key: str) -> Any:
    try:
        return json.loads(header[key])
    except json.JSONDecodeError as exc:
        raise WeightsError(f"metadata field {key!r} is not valid JSON ({exc})") from exc
    except (ValueError, RecursionError) as exc:  # a number past int's digit limit, nesting past the stack
        raise WeightsError(f"metadata field {key!r} is not usable JSON ({type(exc).__name__}: {_short(exc)})") from exc


def _check_models(models: Any) -> None:
    if not isinstance(models, tuple) or not models:
        raise WeightsError(f"models must be a non-empty tuple of names; got {models!r}")
    if len(models) > MAX_MODELS:
        raise WeightsError(f"{len(models)} models; at most {MAX_MODELS}")
    for name in models:
        if not isinstance(name, str) or not name.strip():
            raise WeightsError(f"model names must be non-empty strings; got {name!r}")
        if name != name.strip():  # clients name models in available_models: two that differ only there are a trap
            raise WeightsError(f"model names must not start or end with whitespace; got {name!r}")
    duplicates = sorted(name for name, count in Counter(models).items() if count > 1)
    if duplicates:
        raise WeightsError(f"duplicate model names: {', '.join(duplicates)}")


def _check_tensor(name: str, value: Any, *, ndim: int) -> None:
    if not isinstance(value, np.ndarray):
        raise WeightsError(f"{name} must be a numpy array; got {type(value).__name__}")
    if value.dtype != np.float32:
        raise WeightsError(f"{name} must be float32; got {value.dtype}")
    if value.ndim != ndim:
        raise WeightsError(f"{name} must have {ndim} dimension(s); got shape {value.shape}")
    if not np.isfinite(value).all():
        bad = int((~np.isfinite(value)).sum())
        raise WeightsError(f"{name} has {bad} non-finite value(s) (NaN or inf)")


def _check_range(name: str, value: np.ndarray, *, low: float, high: float) -> None:
    outside = (value < low) | (value > high)
    if outside.any():
        first = tuple(int(i) for i in np.argwhere(outside)[0])
        raise WeightsError(
            f"{name} must lie in [{low}, {high}]; {int(outside.sum())} value(s) outside, "
            f"first at {first}: {float(value[first])}"
        )


def _check_unit_rows(centroids: np.ndarray) -> None:
    norms = np.linalg.norm(centroids.astype(np.float64), axis=1)
    off = np.abs(norms - 1.0) > UNIT_NORM_TOLERANCE
    if off.any():
        row = int(np.argmax(off))
        raise WeightsError(
            f"centroids must be L2-normalised (|norm - 1| <= {UNIT_NORM_TOLERANCE}); "
            f"{int(off.sum())} row(s) are not, first row {row} has norm {norms[row]:.6f}"
        )


def _check_lambda(value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float | np.floating):
        raise WeightsError(f"default_lambda must be a number; got {value!r}")
    if not 0 <= value <= MAX_COST_WEIGHT:  # NaN fails both comparisons
        raise WeightsError(f"default_lambda must be a number from 0 to {MAX_COST_WEIGHT:g}; got {value!r}")


def _check_metadata(metadata: Any) -> None:
    if not isinstance(metadata, Mapping):
        raise WeightsError(f"metadata must be a mapping; got {type(metadata).__name__}")
    try:
        json.dumps(dict(metadata), allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise WeightsError(f"metadata must be JSON-serialisable without NaN/inf ({exc})") from exc


def check_embedder(weights: RouterWeights, model_id: str, model_sha256: str, *, source: str) -> None:
    """Weights hold for the embedder they were fitted with only (centroids live in its space)."""
    if weights.embedder_sha256 != model_sha256:
        raise WeightsError(
            f"{source}: fitted with embedder {weights.embedder_id} sha256 {weights.embedder_sha256[:12]}..., "
            f"but the running embedder is {model_id} sha256 {model_sha256[:12]}..."
        )

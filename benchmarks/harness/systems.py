"""The systems under test, each started on a free port, checked with one request, and always stopped.

``router`` (the service), and the baselines: ``bare`` (Starlette+Hypercorn JSON echo, the HTTP ceiling),
``naive-st`` (``SentenceTransformer.encode`` per request), ``infinity`` (infinity-emb on the same model, when its
binary is given), and the dispatcher on memory and Redis state (set up with bench_dispatcher's own code).
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import orjson

from benchmarks import bench_dispatcher as bd
from benchmarks.common import BENCH_DIR, ServerProcess, find_free_port, running_server

ROUTER, BARE, NAIVE, INFINITY = "router", "bare", "naive-st", "infinity"
DISPATCH_MEMORY, DISPATCH_REDIS = bd.MEMORY, bd.REDIS
SYSTEMS = (BARE, ROUTER, NAIVE, INFINITY, DISPATCH_MEMORY, DISPATCH_REDIS)

OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
INFINITY_ENV = {**OFFLINE_ENV, "INFINITY_ANONYMOUS_USAGE_STATS": "0", "DO_NOT_TRACK": "1"}
INFINITY_MODEL_NAME = "all-MiniLM-L6-v2"
SAMPLE_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class Settings:
    """What starting the systems needs from the command line."""

    host: str
    tmp_dir: Path
    health_timeout_s: float
    stop_timeout_s: float
    heartbeat_timeout_s: float  # the dispatchers' worker heartbeat: covers one warm-up plus one recorded phase
    router_args: tuple[str, ...] = ()
    infinity_bin: str | None = None
    redis_binary: str | None = None


@dataclass
class Running:
    """A started system: where to POST, how to wrap a prompt, what to do before each load point."""

    name: str
    url: str
    pids: dict[str, int]
    encode_prompt: Callable[[str], bytes] | None
    fixed_body: bytes | None = None  # the dispatchers: every request the same (as Vast's SDK sends it)
    before_point: Callable[[], None] = lambda: None
    info: dict[str, Any] = field(default_factory=dict)
    # The dispatchers: their routes by outcome so far; a no-ready answer is a 200 the load generator counts as ok.
    route_outcomes: Callable[[], dict[str, float]] | None = None


class Unavailable(RuntimeError):
    """The system cannot run here (a missing binary); the report says why instead of failing the run."""


def infinity_binary(given: str | None) -> str:
    path = shutil.which(given or "infinity_emb")
    if path is None:
        raise Unavailable(
            "infinity_emb not found: infinity-emb 0.0.78 (the latest) pins numpy<2, sentence-transformers<4 and "
            "transformers<=5.0, so it cannot share this environment (numpy 2, sentence-transformers 6); install "
            "it into its own venv (python -m venv --system-site-packages V && V/bin/pip install "
            "'infinity-emb[server,torch]') and pass --infinity-bin V/bin/infinity_emb"
        )
    return path


def _prompt_body(prompt: str) -> bytes:
    return orjson.dumps({"prompt": prompt})


def _infinity_body(prompt: str) -> bytes:
    return orjson.dumps({"model": INFINITY_MODEL_NAME, "input": [prompt]})


def _check(url: str, body: bytes, key: str) -> dict[str, Any]:
    """One request by hand: 200 and a JSON object with ``key``."""
    resp = httpx.post(url, content=body, headers={"Content-Type": "application/json"}, timeout=SAMPLE_TIMEOUT_S)
    answer = resp.json() if resp.headers.get("content-type", "").startswith("application/json") else None
    if resp.status_code != httpx.codes.OK or not isinstance(answer, dict) or key not in answer:
        raise RuntimeError(f"{url}: sample check failed: HTTP {resp.status_code}: {resp.text[:300]}")
    return {"status": resp.status_code, "client_ms": round(resp.elapsed.total_seconds() * 1e3, 3)}


def router_encoder(base_url: str) -> dict[str, Any]:
    """How the router's encoder runs (``/health``'s ``encoder``): its default dtype depends on the CPU. Empty when
    that cannot be read: it is only a note in the report, not a reason to stop the run."""
    try:
        encoder = httpx.get(base_url + "/health", timeout=SAMPLE_TIMEOUT_S).json().get("encoder")
    except (httpx.HTTPError, ValueError, AttributeError):  # unreachable, not JSON, not an object
        return {}
    return encoder if isinstance(encoder, dict) else {}


def _server(name: str, cmd: list[str], s: Settings, port: int, env: dict[str, str] | None = None) -> ServerProcess:
    base_url = f"http://{s.host}:{port}"
    return ServerProcess(cmd=cmd, base_url=base_url, log_path=s.tmp_dir / f"{name}.log", env=env)


@dataclass(frozen=True)
class _HttpSpec:
    path: str
    check_key: str  # a field every good answer has
    encode_prompt: Callable[[str], bytes]
    env: dict[str, str] | None


_SPECS = {
    BARE: _HttpSpec("/echo", "echo", _prompt_body, None),
    ROUTER: _HttpSpec("/v1/route", "selected_model", _prompt_body, OFFLINE_ENV),
    NAIVE: _HttpSpec("/embed", "embedding", _prompt_body, OFFLINE_ENV),
    INFINITY: _HttpSpec("/embeddings", "data", _infinity_body, INFINITY_ENV),
}


def _command(name: str, s: Settings, port: int) -> list[str]:
    py, where = sys.executable, ["--host", s.host, "--port", str(port)]
    if name == BARE:
        return [py, str(BENCH_DIR / "baselines" / "bare_echo.py"), *where]
    if name == ROUTER:
        return [py, "-m", "service", "serve-router", *where, *s.router_args]
    if name == NAIVE:
        return [py, str(BENCH_DIR / "baselines" / "naive_st.py"), *where]
    from benchmarks.harness.prompts import model_dir

    # Torch engine on CPU, as shipped otherwise (its default batch size 32, its own warm-up before /health).
    return [infinity_binary(s.infinity_bin), "v2", "--model-id", str(model_dir()),
            "--served-model-name", INFINITY_MODEL_NAME, "--engine", "torch", "--device", "cpu",
            "--no-bettertransformer", *where]  # fmt: skip


@contextlib.contextmanager
def start(name: str, s: Settings) -> Iterator[Running]:
    """Start ``name``, wait until healthy, check one answer; stop it (and its redis-server) on the way out."""
    port = find_free_port(s.host)
    if name in (DISPATCH_MEMORY, DISPATCH_REDIS):
        with _dispatcher(name, s, port) as running:
            yield running
        return
    if name not in _SPECS:
        raise ValueError(f"unknown system {name!r}")
    spec, cmd = _SPECS[name], _command(name, s, port)
    server = _server(name, cmd, s, port, spec.env)
    with running_server(server, s.health_timeout_s, s.stop_timeout_s):
        assert server.proc is not None
        url = server.base_url + spec.path
        sample = _check(url, spec.encode_prompt("Benchmark sample: which model should answer this?"), spec.check_key)
        info = {"cmd": cmd, "startup_s": round(server.startup_s or 0.0, 2), "sample": sample}
        if name == ROUTER:
            info["encoder"] = router_encoder(server.base_url)
        yield Running(name, url, {name: server.proc.pid}, spec.encode_prompt, info=info)
    info.update(stop_s=server.stop_s, exit_code=server.exit_code, killed=server.killed)


@contextlib.contextmanager
def _dispatcher(name: str, s: Settings, port: int) -> Iterator[Running]:
    """bench_dispatcher's setup: credentials, optional redis-server, fake workers re-registered before each point."""
    own_dir = s.tmp_dir / name  # each dispatcher its own key files (make_credentials refuses to overwrite)
    own_dir.mkdir(parents=True, exist_ok=True)
    creds = bd.make_credentials(own_dir)
    with contextlib.ExitStack() as stack:
        redis_url, pids = None, {}
        if name == DISPATCH_REDIS:
            if s.redis_binary is None:
                raise Unavailable("redis-server not found on PATH")
            redis = bd.RedisServer(s.redis_binary, s.host, find_free_port(s.host), own_dir, own_dir / "redis.log")
            stack.callback(redis.stop, s.stop_timeout_s)
            redis.start()
            assert redis.proc is not None
            redis_url, pids["redis-server"] = redis.url(), redis.proc.pid
        ns = argparse.Namespace(host=s.host, dispatcher_args="")
        cmd = bd.dispatcher_command(ns, port, creds, s.heartbeat_timeout_s, redis_url)
        server = _server(name, cmd, s, port, bd.dispatcher_env())
        stack.enter_context(running_server(server, s.health_timeout_s, s.stop_timeout_s))
        assert server.proc is not None
        pids[name] = server.proc.pid
        bd.check_health_store(server.base_url, bd.STORE_OF[name])
        bd.register_workers(server.base_url, creds, bd.DEFAULT_WORKERS_PER_ENDPOINT)
        body = {"endpoint": creds.endpoint, "api_key": creds.api_key, "cost": bd.REQUEST_COST}
        sample = bd.check_route(server.base_url, body, creds)
        info = {"cmd": cmd, "startup_s": round(server.startup_s or 0.0, 2), "sample": sample}
        yield Running(
            name,
            server.base_url + bd.ROUTE_PATH,
            pids,
            encode_prompt=None,
            fixed_body=orjson.dumps(body),
            before_point=lambda: bd.register_workers(server.base_url, creds, bd.DEFAULT_WORKERS_PER_ENDPOINT),
            info=info,
            route_outcomes=lambda: bd.route_outcomes(server.base_url, creds.endpoint),
        )

"""Dispatcher ``POST /route/`` throughput vs. a bare Starlette+Hypercorn JSON endpoint (the HTTP ceiling), one run.

1. Creates, in a temp dir and with the package's own functions, an endpoints file (one endpoint, a fresh client
   key and worker token, only their hashes stored) and an Ed25519 signing key.
2. Starts ``redis-server`` on a free port (no persistence), then three servers on free ports and keeps all of them
   up for the whole run:
   - ``bare``: ``benchmarks/baselines/bare_echo.py`` (parse the JSON body, answer JSON), POSTed at ``/echo``;
   - ``dispatcher-memory``: ``python -m service serve-dispatcher`` with in-memory state;
   - ``dispatcher-redis``: the same with ``--redis-url`` and a random ``--redis-prefix``.
3. Registers ``--workers-per-endpoint`` fake ready workers with each dispatcher (``POST /worker_status/``, so huge
   a ``max_perf`` that load never saturates them) and checks one ``/route/`` answer: a worker ``url`` and a valid
   128-hex Ed25519 ``signature`` (with its batch proof, if the answer has one).
4. Interleaved rounds (robust to a noisy box): for each of ``--rounds`` rounds, for each system (the order rotates
   every round), ``--warmup`` s unrecorded then ``--duration`` s recorded with ``wrk/post_json.lua`` at
   ``-t --threads -c --concurrency``. Every request carries the same body,
   ``{"endpoint": NAME, "api_key": KEY, "cost": 100.0}``: a new request each time, as Vast's SDK sends it.
   The dispatcher's own ``dispatcher_routes_total`` counter confirms that every answer was a signed assignment.
5. Stops everything and writes a JSON result and a markdown summary (same stem), and prints the summary.

Targets (median over rounds of dispatcher ok req/s / bare ok req/s in the same round):
in-memory state >= 0.90, Redis state >= 0.50.

Run from the repository root: ``python benchmarks/bench_dispatcher.py`` (needs ``wrk`` and ``redis-server`` on PATH;
``--no-redis`` measures the in-memory dispatcher only).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import secrets
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Collection, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import redis
from prometheus_client.parser import text_string_to_metric_families

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository root, from a plain checkout

from benchmarks.common import (
    BENCH_DIR,
    DEFAULT_HOST,
    HEALTH_TIMEOUT_S,
    KILL_WAIT_S,
    LOG_TAIL_CHARS,
    RESULTS_DIR,
    STOP_TIMEOUT_S,
    WRK_DIR,
    CpuSnapshot,
    ServerError,
    ServerProcess,
    WrkResult,
    _process_tree_cpu_s,
    cpu_detail,
    cpu_snapshot,
    exit_on_sigterm,
    find_free_port,
    foreign_cpu,
    foreign_cpu_warning,
    machine_info,
    output_stem,
    package_version,
    require_wrk,
    run_wrk,
    with_ext,
    write_results,
)
from service.config import ENV_PREFIX
from service.dispatch.endpoints import EndpointRegistry, EndpointSpec, hash_key, new_key, save_config
from service.dispatch.signing import (
    SIGNATURE_HEX_DIGITS,
    Assignment,
    BatchProof,
    KeyRing,
    Signer,
    write_key_file,
)

LUA_SCRIPT = WRK_DIR / "post_json.lua"
BARE_ECHO = BENCH_DIR / "baselines" / "bare_echo.py"
BARE_PATH = "/echo"
ROUTE_PATH = "/route/"
WORKER_STATUS_PATH = "/worker_status/"
METRICS_PATH = "/metrics"
HEALTH_PATH = "/health"

BARE = "bare"
MEMORY = "dispatcher-memory"
REDIS = "dispatcher-redis"
SYSTEMS = (BARE, MEMORY, REDIS)
DISPATCHERS = (MEMORY, REDIS)
STORE_OF = {MEMORY: "memory", REDIS: "redis"}

DEFAULT_ROUNDS = 3
DEFAULT_DURATION_S = 10.0
DEFAULT_WARMUP_S = 2.0
# Below these a result is a smoke test, not a number to report.
MIN_RECORDED_DURATION_S = 10.0
MIN_ROUNDS = 3
# One wrk thread drives far more req/s on loopback than one server process answers; a second thread would only
# compete with the server for a 2-core box's CPU.
DEFAULT_WRK_THREADS = 1
DEFAULT_CONCURRENCY = 32
DEFAULT_WORKERS_PER_ENDPOINT = 4

ENDPOINT_NAME = "bench"
REQUEST_COST = 100.0
# Fake workers: so much capacity that the queue-time limit never turns a request away however many pile up.
WORKER_MAX_PERF = 1e12
WORKER_URL = "http://10.0.0.{n}:8000"
WORKER_ID = "bench-worker-{n}"
WORKER_STATE = "ready"
DISPATCHER_LOG_LEVEL = "warning"
# The fake workers never report requests done, so every routed request stays open for the ttl: a sweep of points
# routes past the default --max-open-requests (100000), whose 429s would end the run. The check is one compare
# either way.
BENCH_MAX_OPEN_REQUESTS = 1_000_000_000
# The dispatcher's default heartbeat timeout; the fake workers report again before every phase, and the timeout
# passed to the dispatchers covers a warm-up plus a recorded phase with this margin to spare.
DISPATCHER_HEARTBEAT_TIMEOUT_S = 30.0
HEARTBEAT_MARGIN_S = 30.0

REDIS_SERVER = "redis-server"
REDIS_READY_TIMEOUT_S = 30.0
REDIS_POLL_INTERVAL_S = 0.1
REDIS_SOCKET_TIMEOUT_S = 1.0
REDIS_DB = 0
REDIS_PREFIX_TEMPLATE = "bench-{token}:"
REDIS_PREFIX_TOKEN_BYTES = 4

TARGETS = {MEMORY: 0.90, REDIS: 0.50}
ROUTES_METRIC = "dispatcher_routes"
ASSIGNED = "assigned"
NO_READY = "no_ready_worker"
# Answers the server finished after wrk stopped counting still show in the counter: allow this share of slack.
ASSIGNED_SHORTFALL_TOLERANCE = 0.01
SAMPLE_TIMEOUT_S = 10.0
SIGNATURE_HEX = re.compile(rf"^[0-9a-f]{{{SIGNATURE_HEX_DIGITS}}}$")

# Warn when a system's slowest and fastest rounds differ by more than this share of its median.
SPREAD_WARN = 0.15


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=DEFAULT_ROUNDS, help="interleaved rounds over all systems")
    parser.add_argument("--duration", type=float, default=DEFAULT_DURATION_S, help="recorded seconds per phase")
    parser.add_argument("--warmup", type=float, default=DEFAULT_WARMUP_S, help="unrecorded seconds before each")
    parser.add_argument("--concurrency", type=int, default=DEFAULT_CONCURRENCY, help="wrk connections (-c)")
    parser.add_argument("--threads", type=int, default=DEFAULT_WRK_THREADS, help="wrk threads (-t)")
    parser.add_argument(
        "--workers-per-endpoint", type=int, default=DEFAULT_WORKERS_PER_ENDPOINT, help="fake workers registered"
    )
    parser.add_argument("--cost", type=float, default=REQUEST_COST, help="'cost' of every routed request")
    parser.add_argument("--host", default=DEFAULT_HOST)
    parser.add_argument("--no-redis", action="store_true", help="skip the Redis-backed dispatcher")
    parser.add_argument("--redis-server", default=REDIS_SERVER, help="redis-server binary")
    parser.add_argument("--health-timeout", type=float, default=HEALTH_TIMEOUT_S, help="seconds to wait for /health")
    parser.add_argument(
        "--stop-timeout", type=float, default=STOP_TIMEOUT_S, help="seconds to wait after SIGTERM before SIGKILL"
    )
    parser.add_argument(
        "--dispatcher-args", default="", help='extra args for both dispatchers, one string: --dispatcher-args="--x 1"'
    )
    parser.add_argument("--out", type=Path, default=None, help="JSON result path (default results/dispatcher-cpu-DATE)")
    parser.add_argument("--strict", action="store_true", help="exit 1 when a target is missed")
    args = parser.parse_args(argv)
    for name in ("rounds", "concurrency", "threads", "workers_per_endpoint"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.duration <= 0 or args.warmup < 0:
        parser.error("--duration must be > 0 and --warmup >= 0")
    return args


# ---------------------------------------------------------------------------------------------------------------
# Setup: endpoint credentials, signing key, Redis
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Credentials:
    """The benchmark endpoint's files and plaintext secrets (all in a temp dir that dies with the run)."""

    endpoint: str
    api_key: str
    worker_token: str
    config_path: Path
    key_path: Path
    signer: Signer


def make_credentials(tmp_dir: Path) -> Credentials:
    api_key, worker_token = new_key("dk"), new_key("wt")
    spec = EndpointSpec(
        name=ENDPOINT_NAME, api_key_sha256=(hash_key(api_key),), worker_token_sha256=(hash_key(worker_token),)
    )
    config_path = tmp_dir / "endpoints.toml"
    save_config(config_path, EndpointRegistry({spec.name: spec}))
    key_path = tmp_dir / "signing.key"
    signer = write_key_file(key_path)
    return Credentials(ENDPOINT_NAME, api_key, worker_token, config_path, key_path, signer)


@dataclass
class RedisServer:
    """A throwaway ``redis-server`` (no RDB, no AOF) in its own session; ready once it answers PING."""

    binary: str
    host: str
    port: int
    workdir: Path
    log_path: Path
    proc: subprocess.Popen[bytes] | None = field(default=None, init=False)
    startup_s: float | None = field(default=None, init=False)
    exit_code: int | None = field(default=None, init=False)

    @property
    def cmd(self) -> list[str]:
        return [self.binary, "--port", str(self.port), "--bind", self.host, "--save", "", "--appendonly", "no",
                "--dir", str(self.workdir)]  # fmt: skip

    def url(self, db: int = REDIS_DB) -> str:
        return f"redis://{self.host}:{self.port}/{db}"

    def start(self, timeout_s: float = REDIS_READY_TIMEOUT_S) -> None:
        began = time.monotonic()
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(self.cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        client = redis.Redis(host=self.host, port=self.port, socket_timeout=REDIS_SOCKET_TIMEOUT_S)
        last = "no answer yet"
        try:
            while time.monotonic() - began < timeout_s:
                if self.proc.poll() is not None:
                    raise ServerError(f"redis-server exited with {self.proc.returncode}\n{self.log_tail()}")
                try:
                    if client.ping():
                        self.startup_s = time.monotonic() - began
                        return
                except redis.RedisError as exc:
                    last = f"{type(exc).__name__}: {exc}"
                time.sleep(REDIS_POLL_INTERVAL_S)
        finally:
            client.close()
        raise ServerError(f"redis-server did not answer PING after {timeout_s:.0f} s (last: {last})\n{self.log_tail()}")

    def stop(self, timeout_s: float = STOP_TIMEOUT_S) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=KILL_WAIT_S)
        self.exit_code = self.proc.returncode

    def log_tail(self, chars: int = LOG_TAIL_CHARS) -> str:
        try:
            return self.log_path.read_text(encoding="utf-8", errors="replace")[-chars:]
        except OSError:
            return ""


def require_redis_server(binary: str) -> str:
    path = shutil.which(binary)
    if path is None:
        raise SystemExit(
            f"{binary} not found on PATH (Debian/Ubuntu: apt-get install redis-server); "
            "pass --no-redis to measure the in-memory dispatcher only"
        )
    return path


def redis_server_version(binary: str) -> str | None:
    try:
        proc = subprocess.run([binary, "--version"], capture_output=True, text=True, check=False, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    match = re.search(r"v=(\S+)", proc.stdout)
    return match.group(1) if match else (proc.stdout.strip() or None)


# ---------------------------------------------------------------------------------------------------------------
# The systems under test
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class System:
    name: str
    server: ServerProcess
    path: str

    @property
    def url(self) -> str:
        return self.server.base_url + self.path

    @property
    def pid(self) -> int | None:
        return self.server.proc.pid if self.server.proc else None


def dispatcher_env() -> dict[str, str]:
    """Blank every ``LLMROUTER_*`` variable (an empty value counts as unset), so only our flags configure them."""
    return {name: "" for name in os.environ if name.startswith(ENV_PREFIX)}


def dispatcher_command(
    args: argparse.Namespace, port: int, creds: Credentials, heartbeat_timeout_s: float, redis_url: str | None
) -> list[str]:
    cmd = [
        sys.executable, "-m", "service", "serve-dispatcher",
        "--host", args.host, "--port", str(port),
        "--config", str(creds.config_path), "--signing-key-file", str(creds.key_path),
        "--heartbeat-timeout-s", f"{heartbeat_timeout_s:g}",
        "--max-open-requests", str(BENCH_MAX_OPEN_REQUESTS),
        "--log-level", DISPATCHER_LOG_LEVEL,
    ]  # fmt: skip
    if redis_url is not None:
        prefix = REDIS_PREFIX_TEMPLATE.format(token=secrets.token_hex(REDIS_PREFIX_TOKEN_BYTES))
        cmd += ["--redis-url", redis_url, "--redis-prefix", prefix]
    return cmd + shlex.split(args.dispatcher_args)


def register_workers(base_url: str, creds: Credentials, count: int) -> None:
    """Report ``count`` ready workers (again: this is also their heartbeat)."""
    headers = {"Authorization": f"Bearer {creds.worker_token}"}
    with httpx.Client(base_url=base_url, headers=headers, timeout=SAMPLE_TIMEOUT_S) as client:
        for n in range(1, count + 1):
            report = {
                "endpoint": creds.endpoint,
                "id": WORKER_ID.format(n=n),
                "url": WORKER_URL.format(n=n),
                "state": WORKER_STATE,
                "max_perf": WORKER_MAX_PERF,
                "cur_load": 0.0,
                "in_flight": 0,
            }
            resp = client.post(WORKER_STATUS_PATH, json=report)
            if resp.status_code != httpx.codes.OK:
                raise RuntimeError(f"{base_url}{WORKER_STATUS_PATH}: HTTP {resp.status_code}: {resp.text[:500]}")


def check_health_store(base_url: str, expected: str) -> None:
    """The dispatcher must run on the state store we meant (an inherited environment could change that)."""
    body = httpx.get(base_url + HEALTH_PATH, timeout=SAMPLE_TIMEOUT_S).json()
    if body.get("store") != expected:
        raise RuntimeError(f"{base_url}: expected {expected} state, /health says {body}")


def check_route(base_url: str, body: dict[str, Any], creds: Credentials) -> dict[str, Any]:
    """One ``/route/`` answer by hand: a worker url and a valid 128-hex signature, or RuntimeError."""
    began = time.perf_counter()
    resp = httpx.post(base_url + ROUTE_PATH, json=body, timeout=SAMPLE_TIMEOUT_S)
    elapsed_ms = (time.perf_counter() - began) * 1e3
    try:
        answer = resp.json()
    except ValueError:
        raise RuntimeError(f"{base_url}{ROUTE_PATH}: HTTP {resp.status_code}, not JSON: {resp.text[:500]}") from None
    problems = []
    if resp.status_code != httpx.codes.OK:
        problems.append(f"HTTP {resp.status_code}")
    if not isinstance(answer, dict):
        raise RuntimeError(f"{base_url}{ROUTE_PATH}: answer is not a JSON object: {answer!r}")
    url, signature = answer.get("url"), answer.get("signature")
    if not isinstance(url, str) or not url:
        problems.append("no worker url (no ready worker?)")
    if not isinstance(signature, str) or not SIGNATURE_HEX.fullmatch(signature):
        problems.append(f"signature is not {SIGNATURE_HEX_DIGITS} lowercase hex digits")
    else:
        try:
            batch = None if answer.get("batch") is None else BatchProof.from_json(answer["batch"])
            verified = KeyRing([creds.signer.public_key]).verify(Assignment.from_mapping(answer), signature, batch)
        except ValueError as exc:
            problems.append(f"not a complete assignment: {exc}")
        else:
            if not verified:
                problems.append("signature does not verify with the benchmark's public key")
    if problems:
        raise RuntimeError(f"{base_url}{ROUTE_PATH} sample check failed ({'; '.join(problems)}): {answer}")
    return {"status": resp.status_code, "client_ms": round(elapsed_ms, 3), "url": url, "signature_ok": True}


def check_bare(base_url: str, body: dict[str, Any]) -> dict[str, Any]:
    began = time.perf_counter()
    resp = httpx.post(base_url + BARE_PATH, json=body, timeout=SAMPLE_TIMEOUT_S)
    elapsed_ms = (time.perf_counter() - began) * 1e3
    if resp.status_code != httpx.codes.OK or resp.json().get("echo") != body:
        raise RuntimeError(f"{base_url}{BARE_PATH} sample check failed: HTTP {resp.status_code}: {resp.text[:500]}")
    return {"status": resp.status_code, "client_ms": round(elapsed_ms, 3)}


def route_outcomes(base_url: str, endpoint: str) -> dict[str, float]:
    """``dispatcher_routes_total`` for ``endpoint`` by outcome, from ``GET /metrics``."""
    resp = httpx.get(base_url + METRICS_PATH, timeout=SAMPLE_TIMEOUT_S)
    resp.raise_for_status()
    counts: dict[str, float] = {}
    for family in text_string_to_metric_families(resp.text):
        if family.name != ROUTES_METRIC:
            continue
        for sample in family.samples:
            if sample.name.endswith("_total") and sample.labels.get("endpoint") == endpoint:
                counts[sample.labels["outcome"]] = sample.value
    return counts


# ---------------------------------------------------------------------------------------------------------------
# Measurement
# ---------------------------------------------------------------------------------------------------------------


CpuSample = tuple[CpuSnapshot | None, dict[str, float]]  # the system's snapshot, and each tracked tree's CPU seconds


def cpu_sample(pids: Mapping[str, int]) -> CpuSample:
    """A system-wide snapshot whose ``tracked`` time covers this process, wrk and every process tree in ``pids``
    (all servers and redis-server: idle ones are ours too), plus each tree's own CPU seconds."""
    snap = cpu_snapshot()
    try:
        per_pid = {name: _process_tree_cpu_s(pid) for name, pid in pids.items()}
    except (OSError, ValueError, IndexError):
        return None, {}
    if snap is None:
        return None, per_pid
    return CpuSnapshot(snap.wall, snap.busy_s, snap.steal_s, snap.tracked_s + sum(per_pid.values())), per_pid


def cpu_between(before: CpuSample, after: CpuSample, *, leave_out: Collection[str] = ()) -> dict[str, Any] | None:
    """``foreign_cpu`` between two ``cpu_sample``s, plus ``process_cores``: each tracked process tree's cores (those
    named in ``leave_out`` counted as ours but not listed)."""
    (start, start_pids), (end, end_pids) = before, after
    cpu: dict[str, Any] | None = foreign_cpu(start, end)
    if cpu is not None and start is not None and end is not None:
        wall = end.wall - start.wall
        names = [n for n in start_pids if n in end_pids and n not in leave_out]
        cpu["process_cores"] = {n: round((end_pids[n] - start_pids[n]) / wall, 3) for n in names}
    return cpu


def measure(
    system: System, args: argparse.Namespace, body_arg: str, duration_s: float, pids: Mapping[str, int]
) -> tuple[WrkResult, dict[str, Any] | None]:
    """One wrk run against ``system``, with the CPU used meanwhile (ours, each of our processes, everyone else's)."""
    before = cpu_sample(pids)
    result = run_wrk(
        system.url,
        LUA_SCRIPT,
        threads=args.threads,
        connections=args.concurrency,
        duration_s=duration_s,
        script_args=[body_arg],
    )
    return result, cpu_between(before, cpu_sample(pids))


def phase_summary(result: WrkResult, cpu: dict[str, Any] | None) -> dict[str, Any]:
    data = result.to_dict()
    data["rps"] = round(result.rps, 2)
    data["ok_rps"] = round(result.ok_rps, 2)
    data["duration_s"] = round(result.duration_s, 3)
    data["latency_ms"] = {k: round(v, 3) for k, v in result.latency_ms.items()}
    data["cpu"] = cpu
    return data


def round_order(systems: list[str], round_index: int) -> list[str]:
    """Rotate the order every round, so no system always runs first (or right after another one)."""
    shift = round_index % len(systems)
    return systems[shift:] + systems[:shift]


def summarize(rounds: list[dict[str, Any]], systems: list[str]) -> dict[str, Any]:
    summary: dict[str, Any] = {}
    for name in systems:
        phases = [r["results"][name] for r in rounds]
        rates = [p["ok_rps"] for p in phases]
        median_round = sorted(phases, key=lambda p: p["ok_rps"])[(len(phases) - 1) // 2]
        median = statistics.median(rates)
        entry: dict[str, Any] = {
            "median_ok_rps": round(median, 2),
            "min_ok_rps": round(min(rates), 2),
            "max_ok_rps": round(max(rates), 2),
            "spread": round((max(rates) - min(rates)) / median, 4) if median else None,
            "ok_rps_per_round": rates,
            "median_round": rounds[phases.index(median_round)]["round"],
            "latency_ms": {q: median_round["latency_ms"][q] for q in ("p50", "p90", "p99")},
        }
        if name != BARE:
            ratios = [r["ratios"][name] for r in rounds]
            entry["ratio_to_bare_per_round"] = ratios
            entry["ratio_to_bare_median"] = statistics.median(ratios)  # unrounded: the target compares it
        summary[name] = entry
    return summary


@contextlib.contextmanager
def started(servers: list[ServerProcess], redis_server: RedisServer | None, stop_timeout_s: float) -> Iterator[None]:
    """Everything stays up for the whole run so that rounds interleave without restarts; all stop at the end."""
    try:
        yield
    finally:
        for server in servers:
            server.stop(stop_timeout_s)
        if redis_server is not None:
            redis_server.stop(stop_timeout_s)


def run(args: argparse.Namespace) -> dict[str, Any]:
    require_wrk()
    warnings: list[str] = []
    if args.duration < MIN_RECORDED_DURATION_S:
        warnings.append(f"--duration {args.duration:g} s is below the {MIN_RECORDED_DURATION_S:g} s minimum")
    if args.rounds < MIN_ROUNDS:
        warnings.append(f"--rounds {args.rounds} is below the minimum of {MIN_ROUNDS}")
    systems = [BARE, MEMORY] if args.no_redis else list(SYSTEMS)
    redis_binary = None if args.no_redis else require_redis_server(args.redis_server)
    if args.no_redis:
        warnings.append("Redis-backed dispatcher skipped (--no-redis)")
    inherited = sorted(dispatcher_env())
    if inherited:
        warnings.append(f"blanked inherited {', '.join(inherited)} for the dispatchers (only our flags count)")
    heartbeat_timeout_s = max(DISPATCHER_HEARTBEAT_TIMEOUT_S, args.warmup + args.duration + HEARTBEAT_MARGIN_S)

    result: dict[str, Any] = {"benchmark": "dispatcher-route-vs-bare", "machine": machine_info()}
    result["machine"].update(
        redis_server=redis_server_version(redis_binary) if redis_binary else None,
        redis_py=package_version("redis"),
        hypercorn=package_version("hypercorn"),
        starlette=package_version("starlette"),
    )

    with tempfile.TemporaryDirectory(prefix="bench_dispatcher_") as tmp:
        tmp_dir = Path(tmp)
        creds = make_credentials(tmp_dir)
        body = {"endpoint": creds.endpoint, "api_key": creds.api_key, "cost": args.cost}
        body_path = tmp_dir / "body.json"
        body_path.write_text(json.dumps(body), encoding="utf-8")
        body_arg = "@" + str(body_path)

        redis_server = None
        if redis_binary is not None:
            redis_port = find_free_port(args.host)
            redis_server = RedisServer(redis_binary, args.host, redis_port, tmp_dir, tmp_dir / "redis.log")

        by_name: dict[str, System] = {}
        for name in systems:
            port = find_free_port(args.host)
            base_url = f"http://{args.host}:{port}"
            log_path = tmp_dir / f"{name}.log"
            if name == BARE:
                cmd = [sys.executable, str(BARE_ECHO), "--host", args.host, "--port", str(port)]
                server = ServerProcess(cmd=cmd, base_url=base_url, log_path=log_path, health_path=HEALTH_PATH)
                by_name[name] = System(name, server, BARE_PATH)
            else:
                redis_url = redis_server.url() if name == REDIS and redis_server else None
                cmd = dispatcher_command(args, port, creds, heartbeat_timeout_s, redis_url)
                server = ServerProcess(
                    cmd=cmd, base_url=base_url, log_path=log_path, health_path=HEALTH_PATH, env=dispatcher_env()
                )
                by_name[name] = System(name, server, ROUTE_PATH)

        result["config"] = {
            "rounds": args.rounds,
            "duration_s": args.duration,
            "warmup_s": args.warmup,
            "concurrency": args.concurrency,
            "wrk_threads": args.threads,
            "workers_per_endpoint": args.workers_per_endpoint,
            "worker_max_perf": WORKER_MAX_PERF,
            "heartbeat_timeout_s": heartbeat_timeout_s,
            "body": {**body, "api_key": "<fresh key, redacted>"},
            "body_bytes": len(body_path.read_bytes()),
            "lua_script": str(LUA_SCRIPT.relative_to(BENCH_DIR.parent)),
            "systems": {name: {"cmd": s.server.cmd, "url": s.url} for name, s in by_name.items()},
            "redis_server_cmd": redis_server.cmd if redis_server else None,
        }

        servers = [by_name[name].server for name in systems]
        rounds: list[dict[str, Any]] = []
        try:
            with started(servers, redis_server, args.stop_timeout):
                if redis_server is not None:
                    print(f"starting redis-server on port {redis_server.port}", flush=True)
                    redis_server.start()
                for name in systems:
                    print(f"starting {name}: {shlex.join(by_name[name].server.cmd)}", flush=True)
                    by_name[name].server.start()
                for name in systems:
                    by_name[name].server.wait_healthy(args.health_timeout)
                pids = {name: s.pid for name, s in by_name.items() if s.pid is not None}
                if redis_server is not None and redis_server.proc is not None:
                    pids["redis-server"] = redis_server.proc.pid

                samples: dict[str, Any] = {"bare": check_bare(by_name[BARE].server.base_url, body)}
                for name in systems[1:]:
                    base_url = by_name[name].server.base_url
                    check_health_store(base_url, STORE_OF[name])
                    register_workers(base_url, creds, args.workers_per_endpoint)
                    samples[name] = check_route(base_url, body, creds)
                result["samples"] = samples
                print("all healthy; sample answers check out", flush=True)

                for index in range(args.rounds):
                    order = round_order(systems, index)
                    entry: dict[str, Any] = {"round": index + 1, "order": order, "results": {}, "ratios": {}}
                    for name in order:
                        system = by_name[name]
                        base_url = system.server.base_url
                        if name != BARE:
                            register_workers(base_url, creds, args.workers_per_endpoint)  # heartbeat
                        if args.warmup > 0:
                            run_wrk(system.url, LUA_SCRIPT, threads=args.threads, connections=args.concurrency,
                                    duration_s=args.warmup, script_args=[body_arg])  # fmt: skip
                        before = route_outcomes(base_url, creds.endpoint) if name != BARE else {}
                        wrk_result, cpu = measure(system, args, body_arg, args.duration, pids)
                        phase = phase_summary(wrk_result, cpu)
                        if name != BARE:
                            after = route_outcomes(base_url, creds.endpoint)
                            phase["route_outcomes"] = {
                                k: int(after.get(k, 0) - before.get(k, 0)) for k in sorted(set(after) | set(before))
                            }
                        entry["results"][name] = phase
                        print(
                            f"round {index + 1} {name}: {wrk_result.ok_rps:.1f} ok req/s, "
                            f"p50 {wrk_result.latency_ms['p50']:.2f} ms, p99 {wrk_result.latency_ms['p99']:.2f} ms",
                            flush=True,
                        )
                    bare_rps = entry["results"][BARE]["ok_rps"]
                    for name in systems[1:]:
                        ratio = entry["results"][name]["ok_rps"] / bare_rps if bare_rps else 0.0
                        entry["ratios"][name] = ratio
                    rounds.append(entry)
        except Exception:
            for name in systems:
                print(f"---- {name} log tail ----\n{by_name[name].server.log_tail()}", file=sys.stderr)
            if redis_server is not None:
                print(f"---- redis-server log tail ----\n{redis_server.log_tail()}", file=sys.stderr)
            raise

        result["servers"] = {
            name: {
                "startup_to_healthy_s": round(s.server.startup_s or 0.0, 3),
                "stop_s": round(s.server.stop_s, 3) if s.server.stop_s is not None else None,
                "exit_code": s.server.exit_code,
                "killed_after_sigterm_timeout": s.server.killed,
            }
            for name, s in by_name.items()
        }
        if redis_server is not None:
            result["servers"]["redis-server"] = {
                "startup_to_ready_s": round(redis_server.startup_s or 0.0, 3),
                "exit_code": redis_server.exit_code,
            }

    result["rounds"] = rounds
    result["summary"] = summarize(rounds, systems)
    warnings += phase_warnings(rounds, result["summary"], result["servers"])

    targets: dict[str, Any] = {}
    for name in systems[1:]:
        ratio = result["summary"][name]["ratio_to_bare_median"]
        targets[name] = {"ratio_to_bare_min": TARGETS[name], "ratio_to_bare": ratio, "pass": ratio >= TARGETS[name]}
    result["targets"] = targets
    result["pass"] = all(t["pass"] for t in targets.values())
    result["warnings"] = warnings
    return result


def phase_warnings(rounds: list[dict[str, Any]], summary: dict[str, Any], servers: dict[str, Any]) -> list[str]:
    warnings = []
    for entry in rounds:
        for name, phase in entry["results"].items():
            where = f"round {entry['round']} {name}"
            if skewed := foreign_cpu_warning(where, phase.get("cpu")):
                warnings.append(skewed)
            socket_errors = phase["socket_errors"]["total"]
            if phase["non_2xx"] or socket_errors:
                warnings.append(f"{where}: {phase['non_2xx']} non-2xx responses, {socket_errors} socket errors")
            outcomes = phase.get("route_outcomes")
            if outcomes is not None:
                assigned = outcomes.get(ASSIGNED, 0)
                if outcomes.get(NO_READY, 0):
                    warnings.append(f"{where}: {outcomes[NO_READY]} answers had no ready worker (not signed)")
                if assigned < phase["ok_requests"] * (1 - ASSIGNED_SHORTFALL_TOLERANCE):
                    warnings.append(
                        f"{where}: the dispatcher counted {assigned} signed assignments for "
                        f"{phase['ok_requests']} ok answers"
                    )
    for name, entry in summary.items():
        if entry["spread"] is not None and entry["spread"] > SPREAD_WARN:
            warnings.append(
                f"{name}: rounds range {entry['min_ok_rps']:.0f}-{entry['max_ok_rps']:.0f} req/s "
                f"({entry['spread']:.0%} of the median): a noisy machine? rerun on an idle one"
            )
    for name, info in servers.items():
        if info.get("killed_after_sigterm_timeout"):
            warnings.append(f"{name} did not exit after SIGTERM in time and was killed")
    return warnings


def markdown_summary(result: dict[str, Any]) -> str:
    m = result["machine"]
    cfg = result["config"]
    summary = result["summary"]
    targets = result["targets"]

    def verdict(ok: bool) -> str:
        return "PASS" if ok else "FAIL"

    lines = [
        f"# Dispatcher benchmark ({m['date']})",
        "",
        f"- Machine: `{m['hostname']}`, {m['cpu_model']}{cpu_detail(m)}, {m['cpu_count']} cores; {m['wrk']}, "
        f"redis-server {m['redis_server'] or 'n/a'}, hypercorn {m['hypercorn']}, starlette {m['starlette']}",
        f"- Commit: `{m['git_commit'] or 'n/a'}`",
        f"- {cfg['rounds']} interleaved round(s) of {cfg['warmup_s']:g} s warm-up + {cfg['duration_s']:g} s recorded "
        f"per system, wrk -t{cfg['wrk_threads']} -c{cfg['concurrency']}, {cfg['workers_per_endpoint']} fake workers, "
        f"body {cfg['body_bytes']} bytes",
        "",
        "| system | median ok req/s | min-max | p50 / p99 ms | ratio to bare |",
        "| --- | ---: | ---: | --- | ---: |",
    ]
    for name, entry in summary.items():
        ratio = entry.get("ratio_to_bare_median")
        ratio_text = "1" if ratio is None else f"{ratio:.4f}"
        lat = entry["latency_ms"]
        lines.append(
            f"| {name} | {entry['median_ok_rps']:.1f} | {entry['min_ok_rps']:.0f}-{entry['max_ok_rps']:.0f} "
            f"| {lat['p50']:.2f} / {lat['p99']:.2f} | {ratio_text} |"
        )
    names = list(summary)
    lines += [
        "",
        "| round | order | " + " | ".join(f"{n} ok req/s" for n in names) + " | other procs (max cores) |",
        "| ---: | --- | " + " | ".join("---:" for _ in names) + " | ---: |",
    ]
    for entry in result["rounds"]:
        rates = " | ".join(f"{entry['results'][n]['ok_rps']:.1f}" for n in names)
        foreign = [p["cpu"]["foreign_cores"] for p in entry["results"].values() if p.get("cpu")]
        foreign_text = f"{max(foreign):.2f}" if foreign else "n/a"
        lines.append(f"| {entry['round']} | {', '.join(entry['order'])} | {rates} | {foreign_text} |")
    lines.append("")
    for name, target in targets.items():
        lines.append(
            f"- {name} / bare = **{target['ratio_to_bare']:.4f}** (median of per-round ratios; target >= "
            f"{target['ratio_to_bare_min']:.2f}): **{verdict(target['pass'])}**"
        )
    lines.append(f"- Overall: **{verdict(result['pass'])}**")
    if result["warnings"]:
        lines += ["", "Warnings:", *(f"- {w}" for w in result["warnings"])]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    exit_on_sigterm()
    args = parse_args(argv)
    out: Path = args.out or with_ext(output_stem(RESULTS_DIR, "dispatcher-cpu"), ".json")  # never over an earlier run
    result = run(args)
    write_results(out, result, markdown_summary(result))
    return 1 if args.strict and not result["pass"] else 0


if __name__ == "__main__":
    raise SystemExit(main())

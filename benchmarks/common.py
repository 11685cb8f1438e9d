"""Shared helpers for the HTTP benchmarks: free ports, a managed server subprocess, wrk runs, machine facts.

Everything here is generic: a server is a command list plus a health URL, and a wrk run is a URL, a Lua script
and its arguments. The Lua scripts print one ``WRK_JSON {...}`` line from ``done()``, which :func:`run_wrk` parses.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import functools
import json
import os
import platform
import random
import resource
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the service package, from a plain checkout
from service.digest import git_commit

REPO_ROOT = Path(__file__).resolve().parent.parent
BENCH_DIR = Path(__file__).resolve().parent
WRK_DIR = BENCH_DIR / "wrk"
RESULTS_DIR = BENCH_DIR / "results"

WRK_JSON_PREFIX = "WRK_JSON "
DEFAULT_HOST = "127.0.0.1"
HEALTH_TIMEOUT_S = 120.0
HEALTH_POLL_INTERVAL_S = 0.25
FAILED_STATUS = "failed"  # what the router's /health says after its load failed (service.router.app.Phase)
HEALTH_REQUEST_TIMEOUT_S = 2.0
STOP_TIMEOUT_S = 30.0
KILL_WAIT_S = 5.0
WRK_SOCKET_TIMEOUT_S = 10
# Extra wall-clock allowance on top of a wrk run's duration before we give up on the process.
WRK_EXTRA_WAIT_S = 60.0
LOG_TAIL_CHARS = 4000
HTTP_OK_MIN = 200
HTTP_OK_MAX = 299

# ---------------------------------------------------------------------------------------------------------------
# Prompts
# ---------------------------------------------------------------------------------------------------------------

# A few hundred common English words; prompts are random sequences of these plus a unique number.
_VOCABULARY_TEXT = """
    the be to of and a in that have it for not on with he as you do at this but his by from they we say her she
    or an will my one all would there their what so up out if about who get which go me when make can like time
    no just him know take people into year your good some could them see other than then now look only come its
    over think also back after use two how our work first well way even new want because any these give day most
    us is are was were been has had did does said made find where thing man world life hand part child eye woman
    place week case point government company number group problem fact right home water room mother area money
    story month lot study book job word business issue side kind head house service friend father power hour game
    line end member law car city community name president team minute idea kid body information school face others
    level office door health person art war history party result change morning reason research girl guy moment air
    teacher force education explain write code function python program error data table list query model network
    server request response cache memory disk file system user account password email message phone price cost
    market sale product customer order delivery travel hotel flight ticket weather rain snow summer winter spring
    music movie song film picture photo color paint draw recipe cook dinner lunch breakfast food bread cheese fruit
    apple coffee tea milk sugar salt chicken fish garden tree flower plant river mountain ocean beach island forest
    animal dog cat horse bird doctor nurse hospital medicine disease pain sleep exercise sport ball football soccer
    math equation number proof theorem physics chemistry biology planet star space energy light sound speed distance
    translate summarize describe compare analyze calculate solve design build test fix improve review plan suggest
    please help quickly simple short long detailed best easy hard small large big little old young great high low
    early late important different possible able free sure real public private local national social political
"""
VOCABULARY: tuple[str, ...] = tuple(dict.fromkeys(_VOCABULARY_TEXT.split()))
MIN_PROMPT_WORDS = 14
MAX_PROMPT_WORDS = 20


def generate_prompts(count: int, seed: int, start_id: int = 0) -> list[str]:
    """``count`` distinct English-like prompts: 14-20 random common words plus a unique request number.

    The number (``start_id + i``) makes every prompt distinct; disjoint ``start_id`` ranges give disjoint sets.
    """
    rng = random.Random(seed * 1_000_003 + start_id)
    prompts = []
    for i in range(count):
        words = rng.choices(VOCABULARY, k=rng.randint(MIN_PROMPT_WORDS, MAX_PROMPT_WORDS))
        insert_at = rng.randint(0, len(words))
        words.insert(insert_at, f"#{start_id + i}")
        prompts.append(" ".join(words).capitalize() + rng.choice(("?", ".", "!")))
    return prompts


def write_lines(path: Path, lines: Sequence[str]) -> None:
    """One item per line (the Lua scripts read the file line by line)."""
    for line in lines:
        if "\n" in line or "\r" in line:
            raise ValueError(f"line contains a newline: {line!r}")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


# ---------------------------------------------------------------------------------------------------------------
# Server subprocess
# ---------------------------------------------------------------------------------------------------------------


def find_free_port(host: str = DEFAULT_HOST) -> int:
    """A TCP port that was free a moment ago (bind to port 0, read it back, release it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


class ServerError(RuntimeError):
    """The server under test failed to start, become healthy or stop."""


def _health_status(resp: httpx.Response) -> object:
    try:
        body = resp.json()
    except ValueError:
        return None
    return body.get("status") if isinstance(body, dict) else None


@dataclass
class ServerProcess:
    """A server under test, run as a subprocess in its own session with its output sent to ``log_path``."""

    cmd: list[str]
    base_url: str
    log_path: Path
    health_path: str = "/health"
    cwd: Path = REPO_ROOT
    env: Mapping[str, str] | None = None
    proc: subprocess.Popen[bytes] | None = field(default=None, init=False)
    startup_s: float | None = field(default=None, init=False)
    exit_code: int | None = field(default=None, init=False)
    stop_s: float | None = field(default=None, init=False)
    killed: bool = field(default=False, init=False)

    def start(self) -> None:
        full_env = {**os.environ, **(self.env or {})}
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                self.cmd, cwd=self.cwd, env=full_env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        self._started_at = time.monotonic()

    def wait_healthy(self, timeout_s: float = HEALTH_TIMEOUT_S) -> float:
        """Poll the health URL until it answers 200; returns seconds since start. Raises ServerError otherwise."""
        assert self.proc is not None, "start() first"
        url = self.base_url + self.health_path
        deadline = self._started_at + timeout_s
        last = "no answer yet"
        with httpx.Client(timeout=HEALTH_REQUEST_TIMEOUT_S) as client:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise ServerError(f"server exited with {self.proc.returncode} before healthy\n{self.log_tail()}")
                try:
                    resp = client.get(url)
                    if resp.status_code == httpx.codes.OK:
                        self.startup_s = time.monotonic() - self._started_at
                        return self.startup_s
                    last = f"HTTP {resp.status_code}"
                    if _health_status(resp) == FAILED_STATUS:  # it will not get better: stop waiting (GPU time)
                        raise ServerError(f"{url} reports a failed start: {resp.text[:500]}\n{self.log_tail()}")
                except httpx.HTTPError as exc:
                    last = f"{type(exc).__name__}: {exc}"
                time.sleep(HEALTH_POLL_INTERVAL_S)
        raise ServerError(f"{url} not healthy after {timeout_s:.0f} s (last: {last})\n{self.log_tail()}")

    def stop(self, timeout_s: float = STOP_TIMEOUT_S) -> int | None:
        """SIGTERM, wait up to ``timeout_s`` for a drained exit, then SIGKILL the whole process group."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            began = time.monotonic()
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.killed = True
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=KILL_WAIT_S)
            self.stop_s = time.monotonic() - began
        self.exit_code = self.proc.returncode
        return self.exit_code

    def log_tail(self, chars: int = LOG_TAIL_CHARS) -> str:
        try:
            return self.log_path.read_text(encoding="utf-8", errors="replace")[-chars:]
        except OSError:
            return ""


@contextlib.contextmanager
def running_server(
    server: ServerProcess, health_timeout_s: float = HEALTH_TIMEOUT_S, stop_timeout_s: float = STOP_TIMEOUT_S
) -> Iterator[ServerProcess]:
    """Start ``server``, wait until healthy, and always stop it on the way out."""
    server.start()
    try:
        server.wait_healthy(health_timeout_s)
        yield server
    finally:
        server.stop(stop_timeout_s)


# ---------------------------------------------------------------------------------------------------------------
# wrk
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class WrkResult:
    """The summary a benchmark Lua script prints from ``done()`` (times in ms, duration in s)."""

    threads: int
    connections: int
    requests: int
    duration_s: float
    rps: float
    ok_rps: float
    latency_ms: dict[str, float]
    non_2xx: int
    socket_errors: dict[str, int]
    bytes: int
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def ok_requests(self) -> int:
        """2xx answers. wrk's ``requests`` counts answers only; a socket error (connect, read, write) is no answer
        and must not be taken off them, and a timeout answered late was still answered."""
        return self.requests - self.non_2xx

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "ok_requests": self.ok_requests}


def require_wrk() -> str:
    path = shutil.which("wrk")
    if path is None:
        raise SystemExit("wrk not found on PATH (Debian/Ubuntu: apt-get install wrk)")
    return path


def parse_wrk_output(stdout: str, threads: int, connections: int) -> WrkResult:
    """Find the ``WRK_JSON`` line in wrk's output and turn it into a :class:`WrkResult`."""
    for line in stdout.splitlines():
        if line.startswith(WRK_JSON_PREFIX):
            data = json.loads(line[len(WRK_JSON_PREFIX) :])
            break
    else:
        raise RuntimeError(f"no {WRK_JSON_PREFIX.strip()} line in wrk output:\n{stdout[-LOG_TAIL_CHARS:]}")
    errors = {k: int(v) for k, v in data["socket_errors"].items()}
    errors["total"] = sum(errors.values())
    requests = int(data["requests"])
    non_2xx = int(data["non_2xx"])
    duration_s = float(data["duration_us"]) / 1e6
    known = {"requests", "duration_us", "latency_us", "non_2xx", "socket_errors", "bytes"}
    return WrkResult(
        threads=threads,
        connections=connections,
        requests=requests,
        duration_s=duration_s,
        rps=requests / duration_s if duration_s else 0.0,
        ok_rps=(requests - non_2xx) / duration_s if duration_s else 0.0,
        latency_ms={k: float(v) / 1e3 for k, v in data["latency_us"].items()},
        non_2xx=non_2xx,
        socket_errors=errors,
        bytes=int(data["bytes"]),
        extra={k: v for k, v in data.items() if k not in known},
    )


def run_wrk(
    url: str,
    script: Path,
    *,
    threads: int,
    connections: int,
    duration_s: float,
    script_args: Sequence[str] = (),
    socket_timeout_s: int = WRK_SOCKET_TIMEOUT_S,
) -> WrkResult:
    """Run wrk once with a Lua script that prints a ``WRK_JSON`` summary, and parse it."""
    wrk = require_wrk()
    cmd = [
        wrk,
        f"-t{threads}",
        f"-c{connections}",
        f"-d{duration_s:g}s",
        f"--timeout={socket_timeout_s}s",
        "-s",
        str(script),
        url,
        "--",
        *script_args,
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=duration_s + WRK_EXTRA_WAIT_S, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"wrk exited with {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
    return parse_wrk_output(proc.stdout, threads, connections)


# ---------------------------------------------------------------------------------------------------------------
# CPU accounting: how much CPU went to processes other than ours during a phase (a shared box skews numbers)
# ---------------------------------------------------------------------------------------------------------------

_CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
# /proc/stat "cpu" line: user nice system idle iowait irq softirq steal ...
_STAT_BUSY_FIELDS = (0, 1, 2, 5, 6)
_STAT_STEAL_FIELD = 7
# /proc/PID/stat fields counted after the ")" that ends the command name (state is 0).
_PID_PPID, _PID_UTIME, _PID_STIME, _PID_CUTIME, _PID_CSTIME = 1, 11, 12, 13, 14


def _system_cpu_s() -> tuple[float, float]:
    """(busy, steal) CPU seconds since boot, all cores together."""
    fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    busy = sum(fields[i] for i in _STAT_BUSY_FIELDS)
    steal = fields[_STAT_STEAL_FIELD] if len(fields) > _STAT_STEAL_FIELD else 0
    return busy / _CLK_TCK, steal / _CLK_TCK


def _process_tree_cpu_s(root_pid: int) -> float:
    """CPU seconds of ``root_pid`` and its live descendants (plus children they have reaped)."""
    stats: dict[int, list[str]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            text = (entry / "stat").read_text()
        except OSError:
            continue
        stats[int(entry.name)] = text[text.rindex(")") + 2 :].split()
    children: dict[int, list[int]] = {}
    for pid, fields in stats.items():
        children.setdefault(int(fields[_PID_PPID]), []).append(pid)
    total, todo = 0, [root_pid]
    while todo:
        pid = todo.pop()
        own = stats.get(pid)
        if own is None:
            continue
        total += sum(int(own[i]) for i in (_PID_UTIME, _PID_STIME, _PID_CUTIME, _PID_CSTIME))
        todo.extend(children.get(pid, []))
    return total / _CLK_TCK


def _own_cpu_s() -> float:
    """This process and its reaped children (e.g. a finished wrk)."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


@dataclass
class CpuSnapshot:
    wall: float
    busy_s: float
    steal_s: float
    tracked_s: float


def cpu_snapshot(server_pid: int | None = None) -> CpuSnapshot | None:
    """System CPU use and our own (this process, reaped children, the server's tree); None off Linux."""
    try:
        busy, steal = _system_cpu_s()
        tracked = _own_cpu_s() + (_process_tree_cpu_s(server_pid) if server_pid else 0.0)
    except (OSError, ValueError, IndexError):
        return None
    return CpuSnapshot(time.monotonic(), busy, steal, tracked)


# Warn when other processes used more than this many cores during a timed phase (the box may be shared).
FOREIGN_CPU_WARN_CORES = 0.15


def foreign_cpu_warning(where: str, cpu: dict[str, float] | None) -> str | None:
    """The warning for a phase whose ``foreign_cpu`` passed ``FOREIGN_CPU_WARN_CORES``, else None."""
    if cpu and cpu["foreign_cores"] > FOREIGN_CPU_WARN_CORES:
        return f"{where}: other processes used {cpu['foreign_cores']:.2f} cores meanwhile; the numbers are skewed"
    return None


def foreign_cpu(before: CpuSnapshot | None, after: CpuSnapshot | None) -> dict[str, float] | None:
    """CPU that went to other processes between two snapshots, in seconds and in cores (seconds per wall second)."""
    if before is None or after is None or after.wall <= before.wall:
        return None
    wall = after.wall - before.wall
    busy = after.busy_s - before.busy_s
    tracked = after.tracked_s - before.tracked_s
    foreign = max(0.0, busy - tracked)
    return {
        "wall_s": round(wall, 3),
        "system_busy_cores": round(busy / wall, 3),
        "ours_cores": round(tracked / wall, 3),
        "foreign_cores": round(foreign / wall, 3),
        "steal_cores": round((after.steal_s - before.steal_s) / wall, 3),
    }


# ---------------------------------------------------------------------------------------------------------------
# Machine facts and output
# ---------------------------------------------------------------------------------------------------------------


def cpu_model() -> str:
    return _cpuinfo_field("model name") or platform.processor() or "unknown"


def cpu_isa(flags: Iterable[str] | None = None) -> str:
    """The widest x86 vector extension the CPU reports: "avx512", "avx2", "avx" or "baseline".

    GEMM-bound figures move with it (oneDNN runs AVX-512 kernels where MKL, on AMD CPUs, keeps to AVX2), and a
    VM's model name alone ("AMD EPYC") does not tell which. ``flags``: the cpuinfo flags (default: this machine's).
    """
    if flags is None:
        flags = _cpuinfo_field("flags").split()
    present = set(flags)
    for isa, flag in (("avx512", "avx512f"), ("avx2", "avx2"), ("avx", "avx")):
        if flag in present:
            return isa
    return "baseline"


def _cpuinfo_field(name: str) -> str:
    """The first value of ``name`` in /proc/cpuinfo ("" where there is none, as off Linux)."""
    return _cpuinfo().get(name, "")


@functools.cache
def _cpuinfo() -> dict[str, str]:
    """/proc/cpuinfo's fields, the first CPU's value of each: read once for all of ``machine_info``'s fields."""
    fields: dict[str, str] = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            fields.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    return fields


def _cpu_family_model() -> str | None:
    """x86 "family/model" ("25/17" is Zen 4, "25/1" Zen 3); None where cpuinfo does not say."""
    family, model = _cpuinfo_field("cpu family"), _cpuinfo_field("model")
    return f"{family}/{model}" if family and model else None


def package_version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def machine_info() -> dict[str, Any]:
    """Facts that make a benchmark number comparable: host, CPU, cores, versions, commit, time."""
    return {
        "hostname": platform.node(),
        "cpu_model": cpu_model(),
        "cpu_isa": cpu_isa(),
        "cpu_family_model": _cpu_family_model(),
        "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "loadavg_at_start": [round(x, 2) for x in os.getloadavg()],
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "torch": package_version("torch"),
        "sentence_transformers": package_version("sentence-transformers"),
        "wrk": _wrk_version(),
        "git_commit": git_commit(REPO_ROOT) or _carried_commit(),
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    }


def cpu_detail(machine: Mapping[str, Any]) -> str:
    """The CPU's vector extension and family/model for a report's machine line, as " (avx512, family/model 25/17)";
    "" for results recorded before these fields."""
    parts = []
    if machine.get("cpu_isa"):
        parts.append(str(machine["cpu_isa"]))
    if machine.get("cpu_family_model"):
        parts.append(f"family/model {machine['cpu_family_model']}")
    return f" ({', '.join(parts)})" if parts else ""


def _carried_commit() -> str | None:
    """On a GPU machine the tree is a copy without .git: the commit gpu_prepare.py wrote into .carry/."""
    try:
        carried = (REPO_ROOT / ".carry" / "commit").read_text().strip()
    except OSError:
        return None
    return f"{carried} (as of gpu_prepare.py; commits since are not reflected)"


def _wrk_version() -> str | None:
    wrk = shutil.which("wrk")
    if wrk is None:
        return None
    proc = subprocess.run([wrk, "-v"], capture_output=True, text=True, check=False, timeout=10)
    lines = (proc.stdout or proc.stderr).splitlines()
    # "wrk 4.1.0 [epoll] Copyright (C) 2012 Will Glozer": keep the part before the copyright notice.
    return lines[0].split("Copyright")[0].strip() if lines else None


def write_json(path: Path, data: Mapping[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n", encoding="utf-8")


def write_results(out: Path, result: Mapping[str, Any], summary: str) -> None:
    """The JSON result at ``out`` and its markdown summary beside it (same stem), echoed to stdout."""
    write_json(out, result)
    out.with_suffix(".md").write_text(summary, encoding="utf-8")
    print()
    print(summary)
    print(f"wrote {out} and {out.with_suffix('.md')}")


def with_ext(stem: Path, ext: str) -> Path:
    """``stem`` plus ``ext``, appended: ``Path.with_suffix`` would replace whatever follows a dot in the label."""
    return stem.with_name(stem.name + ext)


def output_stem(out_dir: Path, machine: str) -> Path:
    """``<machine>-<date>``, with ``-runN`` added rather than overwriting an earlier result."""
    base = f"{machine}-{dt.datetime.now(dt.UTC).date().isoformat()}"
    stem, n = out_dir / base, 1
    while with_ext(stem, ".json").exists():
        n += 1
        stem = out_dir / f"{base}-run{n}"
    return stem


def exit_on_sigterm() -> None:
    """SIGTERM (a time limit, a supervisor) unwinds like Ctrl-C, through the ``finally`` blocks that stop the servers
    under test: they run in sessions of their own, so without this they outlived the benchmark."""
    signal.signal(signal.SIGTERM, _unwind)


def _unwind(signum: int, _frame: object) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second SIGTERM must not cut the unwind short mid-stop
    sys.exit(128 + signum)

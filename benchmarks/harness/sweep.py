"""One workload's sweep: closed-loop points at each concurrency, then open-loop points at fractions of the best
closed-loop throughput (or at given rates), each run by the load generator in its own process."""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks import bench_dispatcher as bd
from benchmarks.common import REPO_ROOT
from benchmarks.harness import priming, prompts, scenarios
from benchmarks.harness.scenarios import Workload
from benchmarks.harness.systems import Running
from benchmarks.loadgen import fanout

LOADGEN_EXTRA_WAIT_S = 120.0  # body loading, a late start, the drain: on top of warm-up + duration
# The load generator's interpreter start, imports and body loading (about 0.5 s on a 2-core VM), with room to
# spare: a start later than that is reported as ``late_start_s`` and warned.
LOADGEN_START_S = 2.0
WINDOW_POLL_S = 0.1  # how often the wait for a window's end checks that the load generator still runs
LOADGEN = "loadgen"  # its process tree is ours: sampled with the servers, left out of the server cores


@dataclass(frozen=True)
class SweepConfig:
    concurrencies: tuple[int, ...]
    rate_fractions: tuple[float, ...]
    rates: tuple[float, ...]  # absolute open-loop rates; used instead of the fractions when given
    duration_s: float
    warmup_s: float
    drain_s: float
    processes: int
    client: str
    seed: int


def point_processes(cfg: SweepConfig, concurrency: int | None) -> int:
    """Client processes for one point: a closed-loop point gets no more than its concurrency (the load generator
    needs at least one connection per process), so ``--client-processes 2`` still runs c=1."""
    return cfg.processes if concurrency is None else max(1, min(cfg.processes, concurrency))


def loadgen_lead_s(processes: int) -> float:
    """How far ahead the harness sets the load generator's start: its interpreter start and imports, plus the
    spawned processes' own lead when there are several."""
    return LOADGEN_START_S + (fanout.SPAWN_LEAD_S if processes > 1 else 0.0)


def run_loadgen(
    url: str, bodies_file: Path, mode_args: list[str], cfg: SweepConfig, out: Path, seed: int, processes: int,
    pids: Mapping[str, int],
) -> tuple[dict[str, Any], dict[str, Any] | None]:  # fmt: skip
    """The load generator's result, and the CPU every process used during its recorded window (sampled here at
    the window's two ends, which the shared ``--start-at`` fixes: start-up, warm-up and drain are left out)."""
    start_at = time.time() + loadgen_lead_s(processes)
    cmd = [
        sys.executable, "-m", "benchmarks.loadgen", "--url", url, "--bodies", str(bodies_file), *mode_args,
        "--duration", f"{cfg.duration_s:g}", "--warmup", f"{cfg.warmup_s:g}", "--drain-timeout", f"{cfg.drain_s:g}",
        "--processes", str(processes), "--client", cfg.client, "--seed", str(seed), "--out", str(out),
        "--start-at", f"{start_at:.6f}",
    ]  # fmt: skip
    deadline = start_at + cfg.warmup_s + cfg.duration_s + cfg.drain_s + LOADGEN_EXTRA_WAIT_S
    with tempfile.TemporaryFile("w+", encoding="utf-8") as stderr:  # a file, not a pipe nobody reads meanwhile
        proc = subprocess.Popen(cmd, cwd=REPO_ROOT, stdout=subprocess.DEVNULL, stderr=stderr, text=True)
        try:
            window_start = start_at + cfg.warmup_s
            cpu = _window_cpu(proc, window_start, window_start + cfg.duration_s, {**pids, LOADGEN: proc.pid})
            returncode = proc.wait(timeout=max(0.0, deadline - time.time()))
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        if returncode != 0:
            stderr.seek(0)
            raise RuntimeError(f"load generator exited with {returncode}:\n{stderr.read()[-3000:]}")
    data: dict[str, Any] = json.loads(out.read_text(encoding="utf-8"))
    return data, cpu


def _window_cpu(
    proc: subprocess.Popen[str], start: float, end: float, pids: Mapping[str, int]
) -> dict[str, Any] | None:
    """System and per-process CPU between ``start`` and ``end`` (``time.time()``); None when the load generator
    exits before the window closes (its error is what matters then)."""
    samples = []
    for at in (start, end):
        while (left := at - time.time()) > 0:
            if proc.poll() is not None:
                return None
            time.sleep(min(left, WINDOW_POLL_S))
        samples.append(bd.cpu_sample(pids))
    return bd.cpu_between(*samples, leave_out=(LOADGEN,))


def measure_point(
    workload: Workload, running: Running, cfg: SweepConfig, tmp_dir: Path, index: int, mode_args: list[str],
    rate_hint: float, concurrency: int | None = None,
) -> dict[str, Any]:  # fmt: skip
    """One load point with the CPU that every process used during its recorded window (ours, the servers',
    everyone else's)."""
    running.before_point()
    count = scenarios.bodies_needed(workload.scenario, rate_hint, cfg.warmup_s + cfg.duration_s)
    body_list = scenarios.bodies(workload, running, count, cfg.seed, index)
    stem = f"{workload.system}-{workload.scenario}-{index}"
    bodies_file = prompts.write_bodies(tmp_dir / f"{stem}.jsonl", body_list)
    # Each point its own arrival seed: one seed would give every rate the same (scaled) sequence, and its luck.
    seed = cfg.seed * 1000 + index
    processes = point_processes(cfg, concurrency)
    out = tmp_dir / f"{stem}.json"
    before = running.route_outcomes() if running.route_outcomes else None
    data, cpu = run_loadgen(running.url, bodies_file, mode_args, cfg, out, seed, processes, running.pids)
    bodies_file.unlink()
    point = {**data["config"], **data["result"], "cpu": cpu, "distinct_bodies": len(body_list)}
    if before is not None and running.route_outcomes:  # warm-up included: the counter has no window
        after = running.route_outcomes()
        point["route_outcomes"] = {k: v - before.get(k, 0.0) for k, v in after.items() if v != before.get(k, 0.0)}
    return point


def prime_if_needed(workload: Workload, running: Running, cfg: SweepConfig) -> dict[str, Any] | None:
    """Send each body of a cache-hit scenario once (a fresh server's cache is empty); the priming's outcome."""
    if workload.scenario not in scenarios.PRIMED:
        return None
    primed = priming.prime(running.url, scenarios.bodies(workload, running, 0, cfg.seed, 0))
    print(f"  {workload.key} primed: {primed['ok']} of {primed['bodies']} bodies answered 2xx", flush=True)
    return primed


def sweep(workload: Workload, running: Running, cfg: SweepConfig, tmp_dir: Path) -> dict[str, Any]:
    primed = prime_if_needed(workload, running, cfg)
    points: list[dict[str, Any]] = []
    best = 0.0
    guess = scenarios.FIRST_RATE_GUESS.get(workload.scenario, 0.0)
    for c in cfg.concurrencies:
        point = measure_point(workload, running, cfg, tmp_dir, len(points), ["--concurrency", str(c)],
                              max(guess, 2 * best), concurrency=c)  # fmt: skip
        best = max(best, point["ok_rps"])
        points.append(point)
        _progress(workload, point)
    # four significant digits, not one decimal: a slow system's 0.25 x 0.18 req/s rounded to a rate of 0 (which the
    # load generator refuses, losing the system), and its 0.5 point missed the half-load target's tolerance
    rates = list(cfg.rates) or [float(f"{f * best:.4g}") for f in cfg.rate_fractions if f * best > 0]
    for rate in rates:
        point = measure_point(workload, running, cfg, tmp_dir, len(points), ["--rate", f"{rate:g}"], rate)
        point["rate_fraction_of_max"] = round(rate / best, 4) if best else None
        points.append(point)
        _progress(workload, point)
    return {
        "system": workload.system,
        "scenario": workload.scenario,
        "max_ok_rps": best,
        "points": points,
        "primed": primed,
    }


def point_label(point: dict[str, Any]) -> str:
    return f"c={point['concurrency']}" if point["mode"] == "closed" else f"rate={point['rate']:g}/s"


def _progress(workload: Workload, point: dict[str, Any]) -> None:
    p50, p99 = (point["latency_ms"].get(q, float("nan")) for q in ("p50", "p99"))
    print(
        f"  {workload.key} {point_label(point)}: {point['ok_rps']:.1f} ok req/s, p50 {p50:.2f} ms, "
        f"p99 {p99:.2f} ms, failed {point['failed']}",
        flush=True,
    )

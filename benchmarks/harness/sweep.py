"""One workload's sweep: closed-loop points at each concurrency, then open-loop points at fractions of the best
closed-loop throughput (or at given rates), each run by the load generator in its own process."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks import bench_dispatcher as bd
from benchmarks.common import REPO_ROOT, foreign_cpu
from benchmarks.harness import priming, prompts, scenarios
from benchmarks.harness.scenarios import Workload
from benchmarks.harness.systems import Running

LOADGEN_EXTRA_WAIT_S = 120.0  # spawn, body loading, drain: on top of warm-up + duration


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


def run_loadgen(
    url: str, bodies_file: Path, mode_args: list[str], cfg: SweepConfig, out: Path, seed: int, processes: int
) -> dict[str, Any]:
    cmd = [
        sys.executable, "-m", "benchmarks.loadgen", "--url", url, "--bodies", str(bodies_file), *mode_args,
        "--duration", f"{cfg.duration_s:g}", "--warmup", f"{cfg.warmup_s:g}", "--drain-timeout", f"{cfg.drain_s:g}",
        "--processes", str(processes), "--client", cfg.client, "--seed", str(seed), "--out", str(out),
    ]  # fmt: skip
    timeout = cfg.warmup_s + cfg.duration_s + cfg.drain_s + LOADGEN_EXTRA_WAIT_S
    proc = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=timeout, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"load generator exited with {proc.returncode}:\n{proc.stderr[-3000:]}")
    data: dict[str, Any] = json.loads(out.read_text(encoding="utf-8"))
    return data


def measure_point(
    workload: Workload, running: Running, cfg: SweepConfig, tmp_dir: Path, index: int, mode_args: list[str],
    rate_hint: float, concurrency: int | None = None,
) -> dict[str, Any]:  # fmt: skip
    """One load point with the CPU that every process used meanwhile (ours, the servers', everyone else's)."""
    running.before_point()
    count = scenarios.bodies_needed(workload.scenario, rate_hint, cfg.warmup_s + cfg.duration_s)
    body_list = scenarios.bodies(workload, running, count, cfg.seed, index)
    stem = f"{workload.system}-{workload.scenario}-{index}"
    bodies_file = prompts.write_bodies(tmp_dir / f"{stem}.jsonl", body_list)
    before, before_pids = bd.cpu_sample(running.pids)
    # Each point its own arrival seed: one seed would give every rate the same (scaled) sequence, and its luck.
    seed = cfg.seed * 1000 + index
    processes = point_processes(cfg, concurrency)
    data = run_loadgen(running.url, bodies_file, mode_args, cfg, tmp_dir / f"{stem}.json", seed, processes)
    after, after_pids = bd.cpu_sample(running.pids)
    bodies_file.unlink()
    cpu: dict[str, Any] | None = foreign_cpu(before, after)
    if cpu is not None and before is not None and after is not None:
        wall = after.wall - before.wall
        cpu["process_cores"] = {n: round((after_pids[n] - before_pids[n]) / wall, 3) for n in before_pids}
    return {**data["config"], **data["result"], "cpu": cpu, "distinct_bodies": len(body_list)}


def sweep(workload: Workload, running: Running, cfg: SweepConfig, tmp_dir: Path) -> dict[str, Any]:
    primed = None
    if workload.scenario in scenarios.PRIMED:
        primed = priming.prime(running.url, scenarios.bodies(workload, running, 0, cfg.seed, 0))
        print(f"  {workload.key} primed: {primed['ok']} of {primed['bodies']} bodies answered 2xx", flush=True)
    points: list[dict[str, Any]] = []
    best = 0.0
    guess = scenarios.FIRST_RATE_GUESS.get(workload.scenario, 0.0)
    for c in cfg.concurrencies:
        point = measure_point(workload, running, cfg, tmp_dir, len(points), ["--concurrency", str(c)],
                              max(guess, 2 * best), concurrency=c)  # fmt: skip
        best = max(best, point["ok_rps"])
        points.append(point)
        _progress(workload, point)
    rates = list(cfg.rates) or [round(f * best, 1) for f in cfg.rate_fractions if f * best > 0]
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

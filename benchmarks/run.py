"""Run a scenario set end to end: ``python -m benchmarks.run --scenarios cpu-default``

Each system is started, warmed up and swept (closed loop at ``--concurrency``, then open loop at
``--rate-fractions`` of its best closed-loop throughput), then stopped; the router and the bare echo then run
``--ceiling-rounds`` interleaved rounds for the HTTP-ceiling targets (harness/rounds.py); with every server stopped,
sentence-transformers' offline ``encode(batch_size=256)`` is timed. Writes ``<out-dir>/<machine>-<date>.json``,
``.md`` and ``.png``, and computes the issue's CPU targets. See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass, field, replace
from itertools import groupby
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository root, from a plain checkout

from benchmarks.bench_dispatcher import DISPATCHER_HEARTBEAT_TIMEOUT_S, HEARTBEAT_MARGIN_S
from benchmarks.common import (
    DEFAULT_HOST,
    HEALTH_TIMEOUT_S,
    REPO_ROOT,
    RESULTS_DIR,
    STOP_TIMEOUT_S,
    cpu_snapshot,
    exit_on_sigterm,
    foreign_cpu,
    machine_info,
    output_stem,
    package_version,
    with_ext,
    write_json,
)
from benchmarks.harness import systems
from benchmarks.harness.plots import plot
from benchmarks.harness.report import render
from benchmarks.harness.rounds import ceiling_rounds
from benchmarks.harness.scenarios import OFFLINE_SETS, SCENARIO_SETS, Workload
from benchmarks.harness.sweep import SweepConfig, sweep
from benchmarks.harness.targets import compute_targets, warnings_for

OFFLINE_TIMEOUT_S = 900.0
# The --machine label becomes a file name: no path separators, no leading dot (hidden file).
MACHINE_LABEL = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]*")
INFINITY_HEALTH_TIMEOUT_S = 300.0  # it loads and warms the model before /health answers


@dataclass
class Outcome:
    """What the systems produced, keyed by workload (``results``) or by system."""

    results: dict[str, dict[str, Any]] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)
    servers: dict[str, Any] = field(default_factory=dict)


def _floats(text: str) -> tuple[float, ...]:
    return tuple(float(x) for x in text.split(",") if x.strip())


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split(",") if x.strip())


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scenarios", default="cpu-default", choices=sorted(SCENARIO_SETS), help="scenario set")
    parser.add_argument("--only", default="", help="comma-separated systems to keep (e.g. router,bare)")
    parser.add_argument("--duration", type=float, default=15.0, help="recorded seconds per point")
    parser.add_argument("--warmup", type=float, default=3.0, help="unrecorded seconds before each point")
    parser.add_argument("--drain-timeout", type=float, default=10.0, help="seconds to wait for stragglers")
    parser.add_argument("--concurrency", type=_ints, default=(1, 16, 64), help="closed-loop points, e.g. 1,16,64")
    parser.add_argument(
        "--rate-fractions", type=_floats, default=(0.25, 0.5, 0.75, 0.9), help="open-loop points: x best ok req/s"
    )
    parser.add_argument("--rates", type=_floats, default=(), help="absolute open-loop rates instead of fractions")
    parser.add_argument("--client-processes", type=int, default=1, help="load generator processes per point")
    parser.add_argument("--client", choices=("http1", "aiohttp"), default="http1")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--ceiling-rounds", type=int, default=3,
        help="interleaved router/bare rounds for the HTTP-ceiling targets, after the sweeps (0: compare the sweeps)",
    )  # fmt: skip
    parser.add_argument("--st-prompts", type=int, default=5000, help="prompts for the offline encode")
    parser.add_argument("--skip-offline", action="store_true", help="skip sentence-transformers' offline encode")
    parser.add_argument("--infinity-bin", default=None, help="infinity_emb executable (its own venv)")
    parser.add_argument("--router-args", default="", help="extra serve-router flags, one string")
    parser.add_argument("--host", default=DEFAULT_HOST)
    parser.add_argument("--health-timeout", type=float, default=HEALTH_TIMEOUT_S)
    parser.add_argument("--stop-timeout", type=float, default=STOP_TIMEOUT_S)
    parser.add_argument("--machine", default=None, help="label in the file name (default cpu-<cores>c)")
    parser.add_argument("--out-dir", type=Path, default=RESULTS_DIR)
    parser.add_argument("--strict", action="store_true", help="exit 1 when a target fails or cannot be checked")
    args = parser.parse_args(argv)
    if problem := _knob_problem(args) or _only_problem(args):
        parser.error(problem)
    return args


def _knob_problem(args: argparse.Namespace) -> str | None:
    """What the load generator or the file names would reject, caught before any system starts."""
    if args.duration <= 0 or args.warmup < 0 or args.drain_timeout < 0:
        return "--duration must be > 0, --warmup and --drain-timeout >= 0"
    if not args.concurrency or min(args.concurrency) < 1:
        return "--concurrency needs at least one point, each >= 1"
    if any(x <= 0 for x in (*args.rate_fractions, *args.rates)):
        return "--rate-fractions and --rates must be > 0"
    if args.client_processes < 1 or args.st_prompts < 1:
        return "--client-processes and --st-prompts must be >= 1"
    if args.ceiling_rounds < 0:
        return "--ceiling-rounds must be >= 0"
    if args.machine is not None and not MACHINE_LABEL.fullmatch(args.machine):
        return f"--machine {args.machine!r}: letters, digits and . _ + - only (it names the result files)"
    return None


def only_systems(text: str) -> set[str]:
    return {s.strip() for s in text.split(",") if s.strip()}


def _only_problem(args: argparse.Namespace) -> str | None:
    """A misspelled --only must not run nothing and exit 0."""
    if not args.only:
        return None
    keep = only_systems(args.only)
    if unknown := keep - set(systems.SYSTEMS):
        return f"--only: unknown system(s) {', '.join(sorted(unknown))}; known: {', '.join(systems.SYSTEMS)}"
    in_set = {w.system for w in SCENARIO_SETS[args.scenarios]}
    if not keep & in_set:
        return f"--only {args.only} keeps nothing of set {args.scenarios} (its systems: {', '.join(sorted(in_set))})"
    return None


def time_offline(args: argparse.Namespace) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "benchmarks.harness.offline", "--prompts", str(args.st_prompts),
           "--seed", str(args.seed)]  # fmt: skip
    env = {**os.environ, **systems.OFFLINE_ENV}
    before = cpu_snapshot()
    proc = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=OFFLINE_TIMEOUT_S)
    if proc.returncode != 0:
        raise RuntimeError(f"offline encode failed ({proc.returncode}): {proc.stderr[-2000:]}")
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    result["cpu"] = foreign_cpu(before, cpu_snapshot())
    return result


def run(args: argparse.Namespace) -> dict[str, Any]:
    workloads = list(SCENARIO_SETS[args.scenarios])
    if args.only:
        keep = only_systems(args.only)
        workloads = [w for w in workloads if w.system in keep]
    cfg = SweepConfig(
        concurrencies=args.concurrency,
        rate_fractions=args.rate_fractions,
        rates=args.rates,
        duration_s=args.duration,
        warmup_s=args.warmup,
        drain_s=args.drain_timeout,
        processes=args.client_processes,
        client=args.client,
        seed=args.seed,
    )
    out = Outcome()
    machine = machine_info()
    machine.update(hypercorn=package_version("hypercorn"), starlette=package_version("starlette"))
    with tempfile.TemporaryDirectory(prefix="bench_run_") as tmp:
        settings = systems.Settings(
            host=args.host,
            tmp_dir=Path(tmp),
            health_timeout_s=args.health_timeout,
            stop_timeout_s=args.stop_timeout,
            heartbeat_timeout_s=max(DISPATCHER_HEARTBEAT_TIMEOUT_S, args.warmup + args.duration + HEARTBEAT_MARGIN_S),
            router_args=tuple(shlex.split(args.router_args)),
            infinity_bin=args.infinity_bin,
            redis_binary=shutil.which("redis-server"),
        )
        for system, group in groupby(workloads, key=lambda w: w.system):
            run_system(system, list(group), settings, cfg, args, out)
        ceilings = {}
        if args.ceiling_rounds:
            print(f"== interleaved rounds for the HTTP ceiling: {args.ceiling_rounds}", flush=True)
            try:
                ceilings = ceiling_rounds(out.results, settings, cfg, Path(tmp), args.ceiling_rounds)
            except Exception as exc:  # the sweeps' numbers stand; the targets then compare their maxima
                out.errors["ceiling-rounds"] = f"{type(exc).__name__}: {exc}"[:3000]
    offline = None
    if args.scenarios in OFFLINE_SETS and any(w.system == systems.ROUTER for w in workloads):
        if args.skip_offline:
            out.skipped["st-offline"] = "--skip-offline"
        else:
            print(f"sentence-transformers offline encode: {args.st_prompts} prompts, batch 256", flush=True)
            try:
                offline = time_offline(args)
                print(f"  {offline['prompts_per_s']:.1f} prompts/s", flush=True)
            except (RuntimeError, subprocess.TimeoutExpired) as exc:
                out.errors["st-offline"] = str(exc)
    router_dtype = out.servers.get(systems.ROUTER, {}).get("encoder", {}).get("dtype")
    targets = compute_targets(out.results, offline, ceilings, router_dtype=router_dtype)
    return {
        "benchmark": "harness",
        "machine": machine,
        "config": {"scenario_set": args.scenarios, **asdict(cfg), "workloads": [w.key for w in workloads]},
        "servers": out.servers,
        "results": out.results,
        "ceiling_rounds": ceilings,
        "offline": offline,
        "targets": targets,
        "pass": overall(targets),
        "skipped": out.skipped,
        "errors": out.errors,
        "warnings": warnings_for(out.results, offline),
    }


def overall(targets: list[dict[str, Any]]) -> bool | None:
    """False when a check failed; None when none failed but some could not be checked (or there were none)."""
    verdicts = [t["pass"] for t in targets]
    if False in verdicts:
        return False
    return None if not verdicts or None in verdicts else True


def run_system(
    system: str, group: list[Workload], settings: systems.Settings, cfg: SweepConfig, args: argparse.Namespace,
    out: Outcome,
) -> None:  # fmt: skip
    """Start one system, sweep each of its workloads, stop it; a system that cannot run is recorded, not fatal."""
    print(f"== {system}: {', '.join(w.scenario for w in group)}", flush=True)
    health = INFINITY_HEALTH_TIMEOUT_S if system == systems.INFINITY else args.health_timeout
    settings = replace(settings, health_timeout_s=max(health, args.health_timeout))
    try:
        with systems.start(system, settings) as running:
            out.servers[system] = running.info
            for workload in group:
                out.results[workload.key] = sweep(workload, running, cfg, settings.tmp_dir)
    except systems.Unavailable as exc:
        out.skipped[system] = str(exc)
        print(f"  skipped: {exc}", flush=True)
    except Exception as exc:  # one broken system must not lose the others' numbers
        out.errors[system] = f"{type(exc).__name__}: {exc}"[:3000]
        print(f"  FAILED: {out.errors[system]}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    exit_on_sigterm()
    args = parse_args(argv)
    result = run(args)
    stem = output_stem(args.out_dir, args.machine or f"cpu-{os.cpu_count()}c")
    result["machine_label"] = stem.name
    if result["results"]:
        result["plot"] = plot(result["results"], with_ext(stem, ".png"), stem.name).name
    write_json(with_ext(stem, ".json"), result)
    with_ext(stem, ".md").write_text(render(result), encoding="utf-8")
    print(f"wrote {stem}.json, {stem}.md" + (f", {stem}.png" if result.get("plot") else ""))
    failed = result["errors"] or (args.strict and result["pass"] is not True)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())

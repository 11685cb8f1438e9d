"""Interleaved rounds for the HTTP-ceiling targets (router / bare echo on the same bodies).

Two sweeps run minutes apart, and on a noisy 2-core VM the same server's throughput moves by more than the margin
such a target checks (harness run 5, `cpu-2c-2026-11-24-run2.md`: the bare echo 1686-1997 req/s and the router
1161-1363 on the same embedding bodies, round to round). So, after the sweeps, both servers are started
together and, round after round, each runs one closed-loop point at the concurrency where its sweep did best, the
order alternating; the ratio is taken within each round and the target reads the median over rounds, as
``bench_dispatcher.py`` does.
"""

from __future__ import annotations

import contextlib
import statistics
from pathlib import Path
from typing import Any

from benchmarks.bench_dispatcher import round_order
from benchmarks.harness import systems
from benchmarks.harness.scenarios import EMBEDDING, REPEATED, Workload
from benchmarks.harness.sweep import SweepConfig, measure_point, prime_if_needed
from benchmarks.harness.systems import BARE, ROUTER

CEILING_SCENARIOS = (REPEATED, EMBEDDING)
# Point indexes of the rounds' load points (file names and seeds), apart from the sweeps' 0, 1, 2, ...
FIRST_ROUND_POINT = 1000


def best_concurrency(result: dict[str, Any]) -> int | None:
    """The concurrency of a sweep's best closed-loop point (None without one)."""
    closed = [p for p in result["points"] if p["mode"] == "closed" and p["ok_rps"] > 0]
    return max(closed, key=lambda p: p["ok_rps"])["concurrency"] if closed else None


def summarize(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Median and range of the per-round ratios (a round whose bare point served nothing has none), unrounded: the
    targets compare them, and a ratio of 0.8996 rounded first passed 0.9."""
    ratios = [row["ratio"] for row in rows if row["ratio"] is not None]
    return {
        "rounds": rows,
        "ratio_median": statistics.median(ratios) if ratios else None,
        "ratio_min": min(ratios) if ratios else None,
        "ratio_max": max(ratios) if ratios else None,
    }


def ceiling_rounds(
    results: dict[str, dict[str, Any]], settings: systems.Settings, cfg: SweepConfig, tmp_dir: Path, rounds: int
) -> dict[str, dict[str, Any]]:
    """For each ceiling scenario both systems swept: ``rounds`` interleaved rounds, summarised."""
    wanted = {}
    for scenario in CEILING_SCENARIOS:
        swept = {name: results.get(f"{name}/{scenario}") for name in (BARE, ROUTER)}
        concurrency = {name: best_concurrency(r) for name, r in swept.items() if r is not None}
        if len(concurrency) == 2 and None not in concurrency.values():
            wanted[scenario] = concurrency
    if rounds < 1 or not wanted:
        return {}
    out: dict[str, dict[str, Any]] = {}
    with contextlib.ExitStack() as stack:
        running = {name: stack.enter_context(systems.start(name, settings)) for name in (BARE, ROUTER)}
        point = FIRST_ROUND_POINT
        for scenario, concurrency in wanted.items():
            workloads = {name: Workload(name, scenario) for name in (BARE, ROUTER)}
            for name, workload in workloads.items():  # fresh servers: the caches the sweeps filled are gone
                prime_if_needed(workload, running[name], cfg)
            rows = []
            for r in range(rounds):
                order = round_order([BARE, ROUTER], r)
                row: dict[str, Any] = {"round": r + 1, "order": order}
                for name in order:
                    c = concurrency[name]
                    measured = measure_point(workloads[name], running[name], cfg, tmp_dir, point,
                                             ["--concurrency", str(c)], 0.0, concurrency=c)  # fmt: skip
                    point += 1
                    cpu = measured.get("cpu") or {}
                    row[name] = {"concurrency": c, "ok_rps": measured["ok_rps"], "failed": measured["failed"],
                                 "foreign_cores": cpu.get("foreign_cores")}  # fmt: skip
                bare_rps = row[BARE]["ok_rps"]
                row["ratio"] = row[ROUTER]["ok_rps"] / bare_rps if bare_rps > 0 else None
                print(f"  ceiling {scenario} round {r + 1}: router {row[ROUTER]['ok_rps']:.1f} / bare "
                      f"{bare_rps:.1f} ok req/s = {row['ratio']:.4f}", flush=True)  # fmt: skip
                rows.append(row)
            out[scenario] = {**summarize(rows), "concurrency": concurrency}
    return out

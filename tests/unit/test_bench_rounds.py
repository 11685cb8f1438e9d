"""The interleaved rounds of the HTTP-ceiling targets: both servers up, the order alternating, each ratio within its
round, the target on their median (the servers and the load points are stand-ins here)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from benchmarks.harness import priming, rounds
from benchmarks.harness.report import render
from benchmarks.harness.scenarios import EMBEDDING, REPEATED, UNIQUE, Workload
from benchmarks.harness.sweep import SweepConfig
from benchmarks.harness.systems import BARE, ROUTER, Running, Settings
from benchmarks.harness.targets import CEILING_SHARE_MIN, UNIQUE_VS_OFFLINE_MIN, compute_targets

CFG = SweepConfig((1, 16, 64), (0.5,), (), 1.0, 0.5, 1.0, processes=1, client="http1", seed=0)


def _sweep(system: str, scenario: str, best_at: int) -> dict[str, Any]:
    points = [{"mode": "closed", "concurrency": c, "ok_rps": 1000.0 if c == best_at else 500.0} for c in (1, 16, 64)]
    points.append({"mode": "open", "concurrency": None, "ok_rps": 2000.0})  # open-loop points do not count
    return {"system": system, "scenario": scenario, "max_ok_rps": 1000.0, "points": points}


@pytest.fixture
def fake_systems(monkeypatch: pytest.MonkeyPatch) -> dict[str, list[Any]]:
    """Stand-in servers and load points: bare serves 2000 req/s in every round, the router 1900, 1700, 1850."""
    log: dict[str, list[Any]] = {"started": [], "points": [], "primed": []}
    router_rps = iter([1900.0, 1700.0, 1850.0, 1000.0, 1100.0, 900.0])

    @contextlib.contextmanager
    def start(name: str, settings: Settings) -> Iterator[Running]:
        log["started"].append(name)
        yield Running(name, f"http://{name}", {}, encode_prompt=lambda text: text.encode())

    def measure_point(workload: Workload, running: Running, cfg: SweepConfig, tmp_dir: Path, index: int,
                      args: list[str], rate_hint: float, concurrency: int | None = None) -> dict[str, Any]:  # fmt: skip
        log["points"].append((workload.key, concurrency, index))
        ok_rps = 2000.0 if workload.system == BARE else next(router_rps)
        return {"ok_rps": ok_rps, "failed": 0, "cpu": {"foreign_cores": 0.01}}

    monkeypatch.setattr(rounds.systems, "start", start)
    monkeypatch.setattr(rounds, "measure_point", measure_point)

    def prime(url: str, bodies: list[bytes]) -> dict[str, Any]:
        log["primed"].append(url)
        return {"ok": len(bodies), "bodies": len(bodies)}

    monkeypatch.setattr(priming, "prime", prime)
    return log


def test_rounds_alternate_both_servers_and_take_each_ratio_within_its_round(
    fake_systems: dict[str, list[Any]], tmp_path: Path
) -> None:
    results = {f"{BARE}/{REPEATED}": _sweep(BARE, REPEATED, 16), f"{ROUTER}/{REPEATED}": _sweep(ROUTER, REPEATED, 64)}
    settings = Settings("127.0.0.1", tmp_path, 1.0, 1.0, 1.0)
    ceilings = rounds.ceiling_rounds(results, settings, CFG, tmp_path, 3)
    assert fake_systems["started"] == [BARE, ROUTER]  # both up together, once
    assert fake_systems["primed"] == ["http://bare", "http://router"]  # fresh servers: their caches filled again
    assert [key for key, _, _ in fake_systems["points"]] == [
        "bare/repeated", "router/repeated", "router/repeated", "bare/repeated", "bare/repeated", "router/repeated",
    ]  # fmt: skip
    assert {key: c for key, c, _ in fake_systems["points"]} == {"bare/repeated": 16, "router/repeated": 64}
    assert len({index for _, _, index in fake_systems["points"]}) == 6  # each point its own files
    repeated = ceilings[REPEATED]
    assert [row["ratio"] for row in repeated["rounds"]] == pytest.approx([0.95, 0.85, 0.925])
    summary = (repeated["ratio_median"], repeated["ratio_min"], repeated["ratio_max"])
    assert summary == pytest.approx((0.925, 0.85, 0.95))
    assert EMBEDDING not in ceilings  # the sweeps did not run it on both systems

    checks = {c["check"]: c for c in compute_targets(results, None, ceilings)}
    ceiling = checks["router repeated vs bare HTTP ceiling"]
    assert (ceiling["value"], ceiling["pass"]) == (pytest.approx(0.925), True)
    assert "median of 3 interleaved rounds" in ceiling["detail"] and "0.8500-0.9500" in ceiling["detail"]
    # without the rounds, the two sweeps' maxima, said so
    fallback = {c["check"]: c for c in compute_targets(results, None)}["router repeated vs bare HTTP ceiling"]
    assert fallback["value"] == 1.0 and "minutes apart" in fallback["detail"]

    run = {
        "machine": {"hostname": "h", "cpu_model": "c", "cpu_count": 2, "python": "3", "torch": "t",
                    "sentence_transformers": "s", "git_commit": None, "date": "d"},
        "config": {"scenario_set": "router", "warmup_s": 1, "duration_s": 1, "concurrencies": [1], "rates": [],
                   "rate_fractions": [0.5], "processes": 1, "client": "http1"},
        "machine_label": "cpu", "targets": [], "pass": None, "results": {}, "ceiling_rounds": ceilings,
        "skipped": {}, "errors": {}, "warnings": [],
    }  # fmt: skip
    report = render(run)
    assert "## HTTP ceiling, repeated: interleaved rounds (router c=64, bare c=16)" in report
    assert "| 2 | router, bare | 2000.0 | 1700.0 | 0.8500 | 0.01 / 0.01 |" in report


def test_no_rounds_without_both_sweeps_or_when_turned_off(fake_systems: dict[str, list[Any]], tmp_path: Path) -> None:
    settings = Settings("127.0.0.1", tmp_path, 1.0, 1.0, 1.0)
    only_router = {f"{ROUTER}/{EMBEDDING}": _sweep(ROUTER, EMBEDDING, 64)}
    assert rounds.ceiling_rounds(only_router, settings, CFG, tmp_path, 3) == {}
    both = {**only_router, f"{BARE}/{EMBEDDING}": _sweep(BARE, EMBEDDING, 64)}
    assert rounds.ceiling_rounds(both, settings, CFG, tmp_path, 0) == {}
    assert fake_systems["started"] == []


def test_ratios_are_compared_with_the_targets_unrounded() -> None:
    """Rounded to 3 places first, 1799.2 / 2000 = 0.8996 read 0.9 and passed the 0.9 target."""
    summary = rounds.summarize([{"ratio": 1799.2 / 2000}])
    assert summary["ratio_median"] < CEILING_SHARE_MIN
    unique = {"max_ok_rps": 164.96, "points": []}  # / 100 prompts/s offline: 1.6496, under 1.65
    checks = {c["check"]: c for c in compute_targets({f"{ROUTER}/{UNIQUE}": unique}, {"prompts_per_s": 100.0})}
    check = checks["router unique prompts vs ST offline encode"]
    assert check["value"] < UNIQUE_VS_OFFLINE_MIN and check["pass"] is False
    assert " over HTTP / " in check["detail"] and check["detail"].endswith("prompts/s in float32")
    named = compute_targets({f"{ROUTER}/{UNIQUE}": unique}, {"prompts_per_s": 100.0}, router_dtype="bfloat16")
    assert "ok req/s over HTTP in bfloat16 / sentence-transformers" in named[0]["detail"]


def test_a_round_whose_bare_point_served_nothing_has_no_ratio() -> None:
    rows = [{"ratio": 0.9}, {"ratio": None}, {"ratio": 0.8}]
    summary = rounds.summarize(rows)
    assert (summary["ratio_median"], summary["ratio_min"], summary["ratio_max"]) == pytest.approx((0.85, 0.8, 0.9))
    assert rounds.summarize([{"ratio": None}])["ratio_median"] is None

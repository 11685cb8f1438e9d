"""bench_router's pure parts: the rounds' prompt sets and the verdict over rounds."""

from __future__ import annotations

from typing import Any

import pytest

from benchmarks import bench_router


def test_round_prompt_sets_are_disjoint_across_phases_and_rounds() -> None:
    rounds = [bench_router.round_prompts(200, seed=0, round_index=i) for i in range(3)]
    every = [text for sets in rounds for name in bench_router.PHASES for text in sets[name]]
    assert all(len(sets[name]) == 200 for sets in rounds for name in bench_router.PHASES)
    assert len(set(every)) == len(every) == 3 * 3 * 200  # no prompt repeats, so the cache never hits
    assert bench_router.round_prompts(200, seed=0, round_index=1) == rounds[1]  # seeded
    assert bench_router.round_prompts(200, seed=1, round_index=1)["main"] != rounds[1]["main"]


def _round(index: int, http_rps: float, st_rps: float | None, c1_p50: float) -> dict[str, Any]:
    record: dict[str, Any] = {
        "round": index,
        "http_concurrent": {"ok_rps": http_rps},
        "http_c1": {"latency_ms": {"p50": c1_p50}},
    }
    if st_rps is not None:
        record["st_encode"] = {"prompts_per_s": st_rps}
        record["ratio"] = http_rps / st_rps
    return record


def test_summary_takes_the_median_of_per_round_ratios_not_the_ratio_of_medians() -> None:
    rounds = [_round(1, 200.0, 100.0, 12.0), _round(2, 260.0, 200.0, 16.0), _round(3, 150.0, 120.0, 13.0)]
    summary = bench_router.summarize(rounds)
    # Ratios 2.0, 1.3, 1.25: the median is 1.3; medians of each side would give 200 / 120 = 1.67.
    assert summary["ratio_median"] == pytest.approx(1.3)
    assert summary["ratio_min"] == pytest.approx(1.25)
    assert summary["ratio_max"] == pytest.approx(2.0)
    assert summary["http_ok_rps_median"] == pytest.approx(200.0)
    assert summary["st_prompts_per_s_median"] == pytest.approx(120.0)
    assert summary["c1_p50_ms_median"] == pytest.approx(13.0)


def test_summary_without_the_encode_timing_has_no_ratio() -> None:
    summary = bench_router.summarize([_round(1, 200.0, None, 12.0), _round(2, 210.0, None, 14.0)])
    assert summary["ratio_median"] is None and summary["st_prompts_per_s_median"] is None
    assert summary["http_ok_rps_median"] == pytest.approx(205.0)
    assert summary["c1_p50_ms_median"] == pytest.approx(13.0)


def test_rounds_must_be_positive() -> None:
    assert bench_router.parse_args(["--rounds", "2"]).rounds == 2
    with pytest.raises(SystemExit):
        bench_router.parse_args(["--rounds", "0"])

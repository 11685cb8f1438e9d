"""bench_router's pure parts: the rounds' prompt sets and the verdict over rounds."""

from __future__ import annotations

from typing import Any

import pytest

from benchmarks import bench_router, common


def test_round_prompt_sets_are_disjoint_across_phases_and_rounds() -> None:
    rounds = [bench_router.round_prompts(200, seed=0, round_index=i) for i in range(3)]
    every = [text for sets in rounds for name in bench_router.PHASES for text in sets[name]]
    assert all(len(sets[name]) == 200 for sets in rounds for name in bench_router.PHASES)
    assert len(set(every)) == len(every) == 3 * 3 * 200  # no prompt repeats, so the cache never hits
    assert bench_router.round_prompts(200, seed=0, round_index=1) == rounds[1]  # seeded
    assert bench_router.round_prompts(200, seed=1, round_index=1)["main"] != rounds[1]["main"]


def _round(index: int, http_rps: float, st_rps: float | None, c1_p50: float, c1_non_2xx: int = 0) -> dict[str, Any]:
    record: dict[str, Any] = {
        "round": index,
        "http_concurrent": {"ok_rps": http_rps},
        "http_c1": {"latency_ms": {"p50": c1_p50}, "non_2xx": c1_non_2xx, "socket_errors": {"total": 0}},
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


def test_the_latency_target_needs_every_answer_at_concurrency_1_ok() -> None:
    fast = [_round(1, 300.0, 200.0, 12.0), _round(2, 300.0, 200.0, 12.0)]
    assert bench_router.verdicts(bench_router.summarize(fast))["c1_p50_pass"]
    # wrk's percentiles include failed answers: fast 500s passed for fast routes
    failing = [_round(1, 300.0, 200.0, 12.0), _round(2, 300.0, 200.0, 12.0, c1_non_2xx=96)]
    targets = bench_router.verdicts(bench_router.summarize(failing))
    assert (targets["c1_failures"], targets["c1_p50_pass"], targets["ratio_pass"]) == (96, False, True)


def test_rounds_must_be_positive() -> None:
    assert bench_router.parse_args(["--rounds", "2"]).rounds == 2
    with pytest.raises(SystemExit):
        bench_router.parse_args(["--rounds", "0"])


@pytest.mark.parametrize(
    "argv",
    [["--duration", "-1"], ["--duration", "0"], ["--c1-duration", "0"], ["--warmup", "-2"], ["--concurrency", "0"],
     ["--threads", "0"], ["--concurrency", "2", "--threads", "4"]],
)  # fmt: skip
def test_durations_and_wrk_sizes_are_checked_before_anything_starts(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exc:
        bench_router.parse_args(argv)
    assert exc.value.code == 2 and argv[0] in capsys.readouterr().err


def test_a_missing_wrk_stops_the_run_before_the_router_starts(monkeypatch: pytest.MonkeyPatch) -> None:
    def started(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("the router was started although wrk is missing")

    monkeypatch.setattr(common.shutil, "which", lambda name: None)
    monkeypatch.setattr(bench_router, "running_server", started)
    with pytest.raises(SystemExit, match="wrk not found"):
        bench_router.run(bench_router.parse_args([]))

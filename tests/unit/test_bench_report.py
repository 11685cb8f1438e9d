"""The harness's target checks, warnings, markdown report and plot, on a hand-built run."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest

from benchmarks.common import FOREIGN_CPU_WARN_CORES, cpu_detail, cpu_isa, foreign_cpu_warning, parse_wrk_output
from benchmarks.harness import systems
from benchmarks.harness.plots import load_order, plot
from benchmarks.harness.report import render, router_encoder_line
from benchmarks.harness.targets import compute_targets, warnings_for
from benchmarks.run import overall


def _point(mode: str, ok_rps: float, p99: float, load: float, fraction: float | None = None, **extra: Any) -> dict:
    point = {
        "mode": mode, "concurrency": int(load) if mode == "closed" else None, "rate": load if mode == "open" else None,
        "processes": 1, "connections": 256 if mode == "open" else int(load),
        "scheduled": int(load * 15) if mode == "open" else 0, "answered_in_window": int(ok_rps * 15),
        "pool_wait_ms": {"p99": 0.01}, "ok_rps": ok_rps, "offered_rps": load if mode == "open" else None, "failed": 0,
        "status": {"200": int(ok_rps)}, "errors": {}, "unfinished": 0, "body_wraps": 0, "distinct_bodies": 10**5,
        "latency_ms": {"p50": p99 / 3, "p90": p99 / 2, "p99": p99, "p99.9": p99 * 1.5}, "send_lag_ms": {"p99": 0.2},
        "client_cpu_cores": 0.1, "cpu": {"foreign_cores": 0.01, "process_cores": {"router": 1.8}},
    }  # fmt: skip
    if fraction is not None:
        point["rate_fraction_of_max"] = fraction
    point.update(extra)
    return point


def _workload(system: str, scenario: str, best: float, half_p99: float) -> dict[str, Any]:
    points = [_point("closed", best * 0.2, 3.0, 1), _point("closed", best, 40.0, 64)]
    points.append(_point("open", best * 0.5, half_p99, best * 0.5, fraction=0.5))
    return {"system": system, "scenario": scenario, "max_ok_rps": best, "points": points}


def _run() -> dict[str, Any]:
    results = {
        "bare/repeated": _workload("bare", "repeated", 2000, 5),
        "bare/embedding": _workload("bare", "embedding", 1600, 5),
        "router/unique": _workload("router", "unique", 900, 30),
        "router/repeated": _workload("router", "repeated", 1900, 8),
        "router/embedding": _workload("router", "embedding", 1200, 60),
    }
    return {"results": results, "offline": {"prompts_per_s": 500.0, "prompts": 5000, "batch_size": 256,
                                            "torch_threads": 2, "seconds": 10.0, "cpu": None}}  # fmt: skip


def test_the_unique_prompt_target_is_na_when_its_best_point_repeated_prompts() -> None:
    run = _run()
    run["results"]["router/unique"]["points"][1]["body_wraps"] = 2  # the c=64 point, the best: cache hits
    checks = {c["check"]: c for c in compute_targets(run["results"], run["offline"])}
    unique = checks["router unique prompts vs ST offline encode"]
    assert (unique["value"], unique["pass"]) == (None, None)
    assert "repeated its prompts (2 wraps)" in unique["detail"]


def test_targets_pass_and_fail_honestly() -> None:
    run = _run()
    checks = {c["check"]: c for c in compute_targets(run["results"], run["offline"])}
    unique = checks["router unique prompts vs ST offline encode"]
    assert unique["value"] == 1.8 and unique["pass"] is True
    assert checks["router repeated vs bare HTTP ceiling"]["value"] == 0.95
    assert checks["router repeated vs bare HTTP ceiling"]["pass"] is True
    assert checks["router embedding vs bare HTTP ceiling"]["value"] == 0.75
    assert checks["router embedding vs bare HTTP ceiling"]["pass"] is False
    assert checks["router unique: p99 at half max load (ms)"]["pass"] is True
    assert checks["router embedding: p99 at half max load (ms)"]["pass"] is False
    assert overall(list(checks.values())) is False


def test_missing_baselines_are_not_a_pass() -> None:
    run = _run()
    del run["results"]["bare/embedding"]
    checks = compute_targets(run["results"], None)
    by_name = {c["check"]: c for c in checks}
    assert by_name["router unique prompts vs ST offline encode"]["pass"] is None
    assert by_name["router embedding vs bare HTTP ceiling"]["pass"] is None
    assert overall([c for c in checks if c["pass"] is not False]) is None
    assert overall([]) is None
    assert overall([{"pass": True}]) is True


def test_warnings_flag_noise_errors_repeats_and_a_busy_client() -> None:
    run = _run()
    points = run["results"]["router/unique"]["points"]
    points[0].update(cpu={"foreign_cores": 0.5, "process_cores": {}}, failed=3, status={"200": 10, "429": 3})
    points[1].update(body_wraps=1, client_cpu_cores=0.95)
    points[2].update(send_lag_ms={"p99": 12.0})
    text = "\n".join(warnings_for(run["results"], run["offline"]))
    for needle in ("0.50 cores", "3 failed", "prompts repeated", "0.95 cores per process", "behind schedule"):
        assert needle in text


def test_report_and_plot_render(tmp_path: Path) -> None:
    run = _run()
    run["targets"] = compute_targets(run["results"], run["offline"])
    run["pass"] = overall(run["targets"])
    run["plot"] = plot(run["results"], tmp_path / "x.png", "test").name
    run.update(
        machine={
            "date": "2026-01-01",
            "hostname": "h",
            "cpu_model": "cpu",
            "cpu_isa": "avx512",
            "cpu_family_model": "25/17",
            "cpu_count": 2,
            "python": "3.11",
            "torch": "2",
            "sentence_transformers": "6",
            "git_commit": "abc",
        },
        config={
            "scenario_set": "cpu-default",
            "warmup_s": 3,
            "duration_s": 15,
            "concurrencies": [1, 64],
            "rates": [],
            "rate_fractions": [0.5],
            "processes": 1,
            "client": "http1",
        },
        machine_label="cpu-2c-2026-01-01",
        skipped={"infinity": "not installed"},
        errors={"naive-st": "RuntimeError: load generator exited with 1:\nTraceback (most recent call last):\n  boom"},
        warnings=["w1"],
        servers={"router": {"cmd": ["python"], "encoder": {"dtype": "bfloat16", "onednn_linear": True}}},
    )
    run["results"]["router/unique"]["points"][2]["ok"] = 999  # a p99.9 of under 1,000 answers is marked
    run["results"]["router/unique"]["points"][1]["ok"] = 1000
    text = render(run)
    assert (tmp_path / "x.png").stat().st_size > 10_000
    assert "| router embedding vs bare HTTP ceiling | 0.75 | >= 0.9 | **FAIL**" in text
    assert "- Machine: `h`, cpu (avx512, family/model 25/17), 2 cores;" in text
    assert "Overall: **FAIL**" in text
    assert "- Router encoder (its `/health`): dtype `bfloat16`, onednn_linear `True`\n" in text
    assert "### router/unique: max 900.0 ok req/s" in text
    assert "| rate=450/s | 450.0 | 450.0 | 10.00 / 15.00 / 30.00 / 45.00* | 0 | 1.80 | 0.10 | 0.01 |" in text
    assert "| c=64 | - | 900.0 | 13.33 / 20.00 / 40.00 / 60.00 | 0 |" in text  # 1,000 answers: a p99.9
    assert text.count("* p99.9 of fewer than 1,000 answers") == 1  # under the one table with such a point
    assert (
        "- `naive-st`: RuntimeError: load generator exited with 1: / Traceback (most recent call last): / boom\n"
        in text
    )
    assert "`infinity`: not installed" in text and "- w1" in text and "![throughput against latency](x.png)" in text


def test_a_latency_target_fails_when_its_point_had_failures() -> None:
    def half_load(**changes: Any) -> dict[str, Any]:
        run = _run()
        run["results"]["router/unique"]["points"][2].update(changes)
        checks = {c["check"]: c for c in compute_targets(run["results"], run["offline"])}
        return checks["router unique: p99 at half max load (ms)"]

    assert half_load()["pass"] is True  # p99 30 ms, nothing failed
    # Fast 429s: the p99 of the 2xx answers is still 30 ms, but the point did not serve every request.
    rejected = half_load(failed=40, status={"200": 410, "429": 40})
    assert rejected["pass"] is False and "40 failed" in rejected["detail"]
    unfinished = half_load(failed=3, unfinished=3)
    assert unfinished["pass"] is False and "3 unfinished" in unfinished["detail"]
    nothing_served = half_load(failed=450, status={"503": 450}, latency_ms={})
    assert nothing_served["pass"] is False and nothing_served["value"] is None


def test_warnings_flag_an_overloaded_rate_and_a_full_client_pool() -> None:
    run = _run()
    half = run["results"]["router/unique"]["points"][2]
    quiet = "\n".join(warnings_for(run["results"], run["offline"]))
    assert "fell behind" not in quiet and "free client connection" not in quiet
    half.update(scheduled=6750, answered_in_window=5000, pool_wait_ms={"p99": 7.5}, failed=2, unfinished=2,
                send_lag_ms={"p99": 767.0})  # fmt: skip
    text = "\n".join(warnings_for(run["results"], run["offline"]))
    assert "router/unique rate=450: 5000 answers arrived in the window for 6750 scheduled" in text
    assert "2 still open when the drain ended" in text
    # a server falling behind holds every client connection: the shortfall says so, the pool's wait is not warned
    assert "free client connection" not in text
    half.update(answered_in_window=6750)
    text = "\n".join(warnings_for(run["results"], run["offline"]))
    assert "waited p99 7.5 ms for a free client connection (all 256 held by requests in flight" in text
    assert "the client started requests p99 767.0 ms behind schedule (client-bound)" in text


def test_plot_joins_points_in_order_of_load_not_of_throughput() -> None:
    # Past its knee the server serves less at c=64 than at c=16, and the 0.9 rate less than the 0.75 one.
    points = [_point("closed", 800, 40, 64), _point("closed", 100, 3, 1), _point("closed", 900, 20, 16)]
    points += [_point("open", 700, 90, 810), _point("open", 750, 60, 675), _point("open", 440, 10, 450)]
    assert [p["concurrency"] for p in load_order(points, "closed")] == [1, 16, 64]
    assert [p["rate"] for p in load_order(points, "open")] == [450, 675, 810]


def test_foreign_cpu_warning_only_past_the_threshold() -> None:
    assert foreign_cpu_warning("c=16", None) is None
    assert foreign_cpu_warning("c=16", {"foreign_cores": FOREIGN_CPU_WARN_CORES}) is None
    warning = foreign_cpu_warning("c=16", {"foreign_cores": 0.4})
    assert warning is not None and warning.startswith("c=16: other processes used 0.40 cores")


def test_wrk_ok_requests_are_its_answers_less_non_2xx_and_socket_errors_are_not_taken_off() -> None:
    """wrk counts a request only once answered; connect, read and write errors never were (they are reported
    beside), and a timed-out request answered late is still in ``requests``."""
    line = (
        'WRK_JSON {"requests":100,"duration_us":2000000,"bytes":5000,"non_2xx":10,'
        '"socket_errors":{"connect":5,"read":3,"write":1,"timeout":2},'
        '"latency_us":{"min":1,"mean":2,"max":3,"stdev":1,"p50":2,"p90":3,"p99":3,"p99.9":3},"body_bytes":40}'
    )
    result = parse_wrk_output(f"Running 2s test\n{line}\n", threads=1, connections=8)
    assert result.ok_requests == 90 and result.ok_rps == 45.0 and result.rps == 50.0
    assert result.socket_errors == {"connect": 5, "read": 3, "write": 1, "timeout": 2, "total": 11}


def test_cpu_isa_is_the_widest_vector_extension_reported() -> None:
    assert cpu_isa(["fpu", "sse2", "avx", "f16c", "avx2", "fma", "avx512f", "avx512bw"]) == "avx512"
    assert cpu_isa(["fpu", "sse2", "avx", "fma", "avx2", "bmi2"]) == "avx2"  # Zen 3: no avx512f
    assert cpu_isa(["avx"]) == "avx" and cpu_isa(["sse2", "avx512_bf16"]) == "baseline"


def test_cpu_detail_for_results_recorded_with_and_without_the_fields() -> None:
    assert cpu_detail({"cpu_isa": "avx2", "cpu_family_model": "25/1"}) == " (avx2, family/model 25/1)"
    assert cpu_detail({"cpu_model": "AMD EPYC"}) == ""  # a JSON recorded before the fields existed


def test_the_router_encoder_line_only_where_the_run_recorded_it() -> None:
    assert router_encoder_line({"servers": {"router": {"cmd": []}}}) == []  # a run from before the field
    assert router_encoder_line({}) == []


def test_the_harness_records_the_routers_encoder_from_its_health(monkeypatch: pytest.MonkeyPatch) -> None:
    asked: list[str] = []

    def get(url: str, **_: Any) -> httpx.Response:
        asked.append(url)
        return httpx.Response(200, json={"status": "ok", "encoder": {"dtype": "float32", "torchscript": True}})

    monkeypatch.setattr(systems.httpx, "get", get)
    assert systems.router_encoder("http://127.0.0.1:1") == {"dtype": "float32", "torchscript": True}
    assert asked == ["http://127.0.0.1:1/health"]

    def down(url: str, **_: Any) -> httpx.Response:
        raise httpx.ConnectError("refused")

    monkeypatch.setattr(systems.httpx, "get", down)
    assert systems.router_encoder("http://127.0.0.1:1") == {}  # a note for the report, never a failed run
    monkeypatch.setattr(systems.httpx, "get", lambda url, **_: httpx.Response(200, text="not json"))
    assert systems.router_encoder("http://127.0.0.1:1") == {}

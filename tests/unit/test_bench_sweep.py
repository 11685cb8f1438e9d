"""A workload's sweep: the priming pass of repeated-bodies scenarios, client processes per point."""

from __future__ import annotations

import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from benchmarks.harness import prompts, scenarios, sweep
from benchmarks.harness.priming import prime
from benchmarks.harness.scenarios import EMBEDDING, REPEATED, Workload
from benchmarks.harness.sweep import SweepConfig
from benchmarks.harness.systems import BARE, ROUTER, Running
from benchmarks.harness.targets import warnings_for
from tests.fakes import stub_http_server

CFG = SweepConfig((1, 4), (0.5,), (), 1.0, 0.5, 1.0, processes=2, client="http1", seed=0)


@pytest.fixture
def counting_server() -> Iterator[tuple[str, list[bytes]]]:
    """A keep-alive HTTP/1.1 server that keeps the bodies it was sent and answers 200."""
    with stub_http_server() as (base, bodies):
        yield f"{base}/v1/route", bodies


def test_priming_sends_every_body_once(counting_server: tuple[str, list[bytes]]) -> None:
    url, sent = counting_server
    bodies = [b'{"prompt": "p%d"}' % i for i in range(50)]
    result = prime(url, bodies, concurrency=4)
    assert result == {"bodies": 50, "ok": 50, "status": {"200": 50}, "errors": {}}
    assert Counter(sent) == Counter(dict.fromkeys(bodies, 1))


def _running() -> Running:
    return Running("router", "http://127.0.0.1:9/v1/route", {}, encode_prompt=lambda t: t.encode())


def _fake_points(monkeypatch: pytest.MonkeyPatch, calls: list[tuple[str, Any]]) -> None:
    def fake_prime(url: str, bodies: list[bytes]) -> dict[str, Any]:
        calls.append(("prime", bodies))
        return {"bodies": len(bodies), "ok": len(bodies) - 1, "status": {"200": len(bodies) - 1, "429": 1},
                "errors": {}}  # fmt: skip

    def fake_point(
        workload: Workload, running: Running, cfg: SweepConfig, tmp_dir: Path, index: int, *args: Any, **kw: Any
    ) -> dict[str, Any]:
        calls.append(("point", index))
        body_list = scenarios.bodies(workload, running, 0, cfg.seed, index)
        return {"mode": "closed", "concurrency": 1, "ok_rps": 100.0, "bodies": body_list}

    monkeypatch.setattr(sweep.priming, "prime", fake_prime)
    monkeypatch.setattr(sweep, "measure_point", fake_point)
    monkeypatch.setattr(sweep, "_progress", lambda workload, point: None)


def test_repeated_bodies_are_primed_once_before_the_first_point(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    calls: list[tuple[str, Any]] = []
    _fake_points(monkeypatch, calls)
    result = sweep.sweep(Workload(ROUTER, REPEATED), _running(), CFG, tmp_path)
    assert [kind for kind, _ in calls] == ["prime", "point", "point", "point"]
    primed_bodies = calls[0][1]
    assert len(primed_bodies) == scenarios.REPEATED_PROMPTS
    assert all(point["bodies"] == primed_bodies for point in result["points"])  # the bodies the points send
    assert result["primed"]["ok"] == scenarios.REPEATED_PROMPTS - 1
    result["points"] = []
    warnings = warnings_for({"router/repeated": result}, None)
    assert warnings == ["router/repeated: priming answered 255 of 256 bodies 2xx (status {'200': 255, '429': 1}, "
                        "errors {}): its points include cache misses"]  # fmt: skip


def test_bodies_that_never_repeat_are_not_primed(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    calls: list[tuple[str, Any]] = []
    _fake_points(monkeypatch, calls)
    result = sweep.sweep(Workload(BARE, EMBEDDING), _running(), CFG, tmp_path)
    assert [kind for kind, _ in calls] == ["point", "point", "point"] and result["primed"] is None


# Sleeps argv[1] s, spins argv[2] s, then sleeps.
SPIN = (
    "import sys, time\ntime.sleep(float(sys.argv[1]))\nend = time.time() + float(sys.argv[2])\n"
    "while time.time() < end: pass\ntime.sleep(60)"
)


def test_a_points_cpu_covers_the_recorded_window_only(
    counting_server: tuple[str, list[bytes]], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Two stand-in servers: one busy only while the load generator starts and warms up, one busy only from the
    window on. The point's server cores see the second and not the first (the load generator itself is neither)."""
    url, sent = counting_server
    monkeypatch.setattr(sweep, "LOADGEN_START_S", 1.5)
    cfg = SweepConfig((1,), (), (), duration_s=1.0, warmup_s=1.0, drain_s=2.0, processes=1, client="http1", seed=0)
    bodies = prompts.write_bodies(tmp_path / "b.jsonl", [b'{"prompt": "p%d"}' % i for i in range(20)])
    # The window opens 2.5 s from now: "early" spins for its first second, "late" from 2.2 s on.
    early = subprocess.Popen([sys.executable, "-c", SPIN, "0", "1.0"])
    late = subprocess.Popen([sys.executable, "-c", SPIN, "2.2", "30"])
    try:
        data, cpu = sweep.run_loadgen(url, bodies, ["--concurrency", "1"], cfg, tmp_path / "out.json", 0, 1,
                                      {"early": early.pid, "late": late.pid})  # fmt: skip
    finally:
        for proc in (early, late):
            proc.kill()
            proc.wait()
    assert data["result"]["ok"] > 0 and len(sent) >= data["result"]["ok"]
    assert cpu is not None and set(cpu["process_cores"]) == {"early", "late"}
    assert cpu["wall_s"] == pytest.approx(1.0, abs=0.3)
    assert cpu["process_cores"]["early"] < 0.1  # its whole second of CPU fell before the window
    assert cpu["process_cores"]["late"] > 0.3  # spinning all through the window (on a shared 2-core box)


def test_a_late_client_start_is_warned() -> None:
    point = {"mode": "closed", "concurrency": 4, "failed": 0, "body_wraps": 0, "distinct_bodies": 1, "processes": 1,
             "client_cpu_cores": 0.1, "late_start_s": 0.4, "cpu": None}  # fmt: skip
    result = {"scenario": EMBEDDING, "primed": None, "points": [point]}
    assert warnings_for({"bare/embedding": result}, None) == [
        "bare/embedding c=4: the client started 0.40 s late, so the CPU columns cover a window that much earlier "
        "than the recorded one"
    ]
    point["late_start_s"] = 0.01
    assert warnings_for({"bare/embedding": result}, None) == []


def test_a_slow_systems_open_loop_rates_are_never_rounded_away(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """At 0.18 req/s, one decimal made 0.25 x best a rate of 0.0 (the load generator refused it and the system was
    lost) and 0.5 x best 0.1, a fraction of 0.56 that the half-load target could not find."""
    rates: list[float] = []

    def fake_point(workload: Workload, running: Running, cfg: SweepConfig, tmp_dir: Path, index: int,
                   args: list[str], offered: float, concurrency: int | None = None) -> dict[str, Any]:  # fmt: skip
        if args[0] == "--rate":
            rates.append(float(args[1]))
        return {"mode": "closed", "concurrency": 1, "ok_rps": 0.18, "bodies": []}

    monkeypatch.setattr(sweep, "measure_point", fake_point)
    monkeypatch.setattr(sweep, "_progress", lambda workload, point: None)
    cfg = SweepConfig((1,), (0.25, 0.5), (), 1.0, 0.5, 1.0, processes=1, client="http1", seed=0)
    result = sweep.sweep(Workload(BARE, EMBEDDING), _running(), cfg, tmp_path)
    assert rates == [0.045, 0.09]
    assert [p["rate_fraction_of_max"] for p in result["points"][1:]] == [0.25, 0.5]


def test_dispatcher_no_ready_answers_are_recorded_and_warned(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A no-ready answer is a 200 without an assignment: the load generator counts it as ok, so the point keeps the
    dispatcher's own count of route outcomes over its run, and the report warns."""
    counters = iter([{"assigned": 10.0, "no_ready_worker": 2.0}, {"assigned": 510.0, "no_ready_worker": 9.0}])
    running = Running("dispatcher-memory", "http://127.0.0.1:9/route/", {}, encode_prompt=None, fixed_body=b"{}",
                      route_outcomes=lambda: next(counters))  # fmt: skip

    def fake_loadgen(*args: Any) -> tuple[dict[str, Any], None]:
        result = {"mode": "closed", "concurrency": 4, "failed": 0, "body_wraps": 0, "processes": 1,
                  "client_cpu_cores": 0.1}  # fmt: skip
        return {"config": {}, "result": result}, None

    monkeypatch.setattr(sweep, "run_loadgen", fake_loadgen)
    workload = Workload("dispatcher-memory", scenarios.ROUTE)
    point = sweep.measure_point(workload, running, CFG, tmp_path, 0, ["--concurrency", "4"], 100.0, concurrency=4)
    assert point["route_outcomes"] == {"assigned": 500.0, "no_ready_worker": 7.0}
    result = {"scenario": scenarios.ROUTE, "primed": None, "points": [point]}
    assert warnings_for({"dispatcher-memory/route": result}, None) == [
        "dispatcher-memory/route c=4: 7 answers (warm-up included) had no ready worker: 200s without an assignment, "
        "counted as ok"
    ]
    point["route_outcomes"] = {"assigned": 500.0}
    assert warnings_for({"dispatcher-memory/route": result}, None) == []

"""The issue's CPU targets, computed from one run's results, plus the warnings that make a number suspect."""

from __future__ import annotations

from typing import Any

from benchmarks.bench_dispatcher import NO_READY as NO_READY_WORKER
from benchmarks.common import foreign_cpu_warning
from benchmarks.harness.scenarios import EMBEDDING, MIXED, REPEATED, UNIQUE
from benchmarks.harness.systems import BARE, ROUTER

UNIQUE_VS_OFFLINE_MIN = 1.65
CEILING_SHARE_MIN = 0.90
HALF_LOAD_FRACTION = 0.5
HALF_LOAD_P99_MAX_MS = 50.0

# A latency target passes only when its point had no failure at all (non-2xx, exception or unfinished): the
# percentiles cover 2xx answers only, so any share of failures would be left out of them.
LATENCY_TARGET_MAX_FAILED = 0

CLIENT_CPU_WARN_CORES = 0.8  # per client process: near one core, the client may be the bottleneck
SEND_LAG_WARN_MS = 5.0  # open loop: the client started requests this late at p99: it could not keep its schedule
POOL_WAIT_WARN_MS = 1.0  # open loop: p99 wait for one of the client's connections (all busy)
LATE_START_WARN_S = 0.05  # the client began this long after the harness's --start-at (its CPU window is shifted)
# Open loop: answers that arrived inside the window this far below the arrivals scheduled in it mean the server
# fell behind at that rate (Poisson noise and the window's edges are far smaller at the rates swept).
OPEN_LOOP_SHORTFALL_WARN = 0.05
FRACTION_TOLERANCE = 0.01


def _check(name: str, value: float | None, target: float, higher_is_better: bool, detail: str) -> dict[str, Any]:
    passed = None if value is None else (value >= target if higher_is_better else value < target)
    op = ">=" if higher_is_better else "<"
    return {"check": name, "value": value, "target": f"{op} {target:g}", "pass": passed, "detail": detail}


def _half_load_point(result: dict[str, Any]) -> dict[str, Any] | None:
    for point in result["points"]:
        fraction = point.get("rate_fraction_of_max")
        if fraction is not None and abs(fraction - HALF_LOAD_FRACTION) <= FRACTION_TOLERANCE:
            return point
    return None


def _half_load_check(scenario: str, result: dict[str, Any]) -> dict[str, Any]:
    """p99 of the 2xx answers at half load; FAIL whenever the point had failures, whatever the p99."""
    name = f"router {scenario}: p99 at half max load (ms)"
    point = _half_load_point(result)
    if point is None:
        missing = "no open-loop point at 0.5 x max (add 0.5 to --rate-fractions)"
        return _check(name, None, HALF_LOAD_P99_MAX_MS, False, missing)
    p99 = point["latency_ms"].get("p99")
    detail = f"open loop at {point['rate']:g} req/s = 0.5 x max {result['max_ok_rps']:.1f}; p99 of 2xx answers"
    check = _check(name, p99, HALF_LOAD_P99_MAX_MS, False, detail)
    if point["failed"] > LATENCY_TARGET_MAX_FAILED or p99 is None:
        unfinished = f", {point['unfinished']} unfinished" if point.get("unfinished") else ""
        check["pass"] = False
        check["detail"] += f"; {point['failed']} failed{unfinished}: a latency target needs every request served"
    return check


def compute_targets(
    results: dict[str, dict[str, Any]],
    offline: dict[str, Any] | None,
    ceilings: dict[str, dict[str, Any]] | None = None,
    router_dtype: str | None = None,
) -> list[dict[str, Any]]:
    """One entry per check; ``pass`` is None when the run lacks what the check needs (``detail`` says what).
    ``ceilings``: the interleaved rounds (``rounds.ceiling_rounds``), which the HTTP-ceiling checks read when
    present; without them they compare the two sweeps' maxima. ``router_dtype``: the router's encoder dtype (its
    ``/health``), named in the unique-prompt check, whose offline encode is always fp32."""
    checks = []
    unique = results.get(f"{ROUTER}/{UNIQUE}")
    if unique is not None:
        st = offline["prompts_per_s"] if offline else None
        ratio = unique["max_ok_rps"] / st if st else None  # unrounded: 0.8996 must not pass 0.9
        in_dtype = f" in {router_dtype}" if router_dtype else ""
        detail = (
            f"router unique-prompt max {unique['max_ok_rps']:.1f} ok req/s over HTTP{in_dtype} / sentence-transformers "
            f"encode(batch_size=256) {st:.1f} prompts/s in float32"
            if st
            else "sentence-transformers' offline encode was not timed"
        )
        wraps = max((p["body_wraps"] for p in unique["points"] if p["ok_rps"] == unique["max_ok_rps"]), default=0)
        if wraps:  # its prompts ran out and came round again, to the cache: not the embedder's speed
            ratio, detail = None, f"{detail}; n/a: that point repeated its prompts ({wraps} wraps), cache hits"
        checks.append(_check("router unique prompts vs ST offline encode", ratio, UNIQUE_VS_OFFLINE_MIN, True, detail))
    for scenario in (REPEATED, EMBEDDING):
        mine, ceiling = results.get(f"{ROUTER}/{scenario}"), results.get(f"{BARE}/{scenario}")
        if mine is None:
            continue
        name = f"router {scenario} vs bare HTTP ceiling"
        interleaved = (ceilings or {}).get(scenario)
        if interleaved is not None:
            detail = _rounds_detail(interleaved)
            checks.append(_check(name, interleaved["ratio_median"], CEILING_SHARE_MIN, True, detail))
            continue
        share = mine["max_ok_rps"] / ceiling["max_ok_rps"] if ceiling and ceiling["max_ok_rps"] else None
        detail = (
            f"router {mine['max_ok_rps']:.1f} / bare echo {ceiling['max_ok_rps']:.1f} max ok req/s, same bodies "
            "(the two sweeps' maxima, minutes apart: no interleaved rounds)"
            if ceiling
            else f"the bare echo did not run the {scenario} bodies"
        )
        checks.append(_check(name, share, CEILING_SHARE_MIN, True, detail))
    for scenario in (UNIQUE, REPEATED, EMBEDDING, MIXED):
        mine = results.get(f"{ROUTER}/{scenario}")
        if mine is not None:
            checks.append(_half_load_check(scenario, mine))
    return checks


def _rounds_detail(interleaved: dict[str, Any]) -> str:
    rows, c = interleaved["rounds"], interleaved["concurrency"]
    spread = (
        "" if interleaved["ratio_min"] is None else f" {interleaved['ratio_min']:.4f}-{interleaved['ratio_max']:.4f}"
    )
    return (
        f"median of {len(rows)} interleaved rounds' router / bare echo ok req/s (rounds{spread}), router at "
        f"c={c[ROUTER]}, bare at c={c[BARE]} (each sweep's best), same bodies, both servers up"
    )


def warnings_for(results: dict[str, dict[str, Any]], offline: dict[str, Any] | None) -> list[str]:
    out = []
    for key, result in results.items():
        primed = result.get("primed")
        if primed and primed["ok"] < primed["bodies"]:
            out.append(
                f"{key}: priming answered {primed['ok']} of {primed['bodies']} bodies 2xx (status "
                f"{primed['status']}, errors {primed['errors']}): its points include cache misses"
            )
        for point in result["points"]:
            where = f"{key} " + (
                f"c={point['concurrency']}" if point["mode"] == "closed" else f"rate={point['rate']:g}"
            )
            if skewed := foreign_cpu_warning(where, point.get("cpu")):
                out.append(skewed)
            late = point.get("late_start_s", 0.0)
            if late > LATE_START_WARN_S:
                out.append(
                    f"{where}: the client started {late:.2f} s late, so the CPU columns cover a window that "
                    "much earlier than the recorded one"
                )
            if point["failed"]:
                unfinished = point.get("unfinished", 0)
                open_at_end = f", {unfinished} still open when the drain ended" if unfinished else ""
                out.append(
                    f"{where}: {point['failed']} failed (status {point['status']}, errors {point['errors']}"
                    f"{open_at_end}); the latency percentiles cover 2xx answers only"
                )
            if no_ready := point.get("route_outcomes", {}).get(NO_READY_WORKER):
                out.append(
                    f"{where}: {no_ready:g} answers (warm-up included) had no ready worker: 200s without an "
                    "assignment, counted as ok"
                )
            if shortfall := _open_loop_shortfall(where, point):
                out.append(shortfall)
            if point["body_wraps"] and point["distinct_bodies"] > 1 and result["scenario"] in (UNIQUE, MIXED):
                out.append(f"{where}: prompts repeated ({point['body_wraps']} wraps): cache hits inflate it")
            per_process = point["client_cpu_cores"] / max(1, point["processes"])
            if per_process > CLIENT_CPU_WARN_CORES:
                out.append(f"{where}: the client used {per_process:.2f} cores per process; add --client-processes")
            lag = point.get("send_lag_ms", {}).get("p99")
            if point["mode"] == "open" and lag is not None and lag > SEND_LAG_WARN_MS:
                out.append(f"{where}: the client started requests p99 {lag:.1f} ms behind schedule (client-bound)")
            wait = point.get("pool_wait_ms", {}).get("p99")
            if shortfall or point["mode"] != "open" or wait is None or wait <= POOL_WAIT_WARN_MS:
                continue  # a server falling behind holds every connection: the shortfall says it already
            out.append(
                f"{where}: requests waited p99 {wait:.1f} ms for a free client connection (all "
                f"{point['connections']} held by requests in flight; counted in their latency): more --connections "
                "change that only if the server serves more requests at once"
            )
    if offline and (skewed := foreign_cpu_warning("offline encode", offline.get("cpu"))):
        out.append(skewed)
    return out


def _open_loop_shortfall(where: str, point: dict[str, Any]) -> str | None:
    """The warning for an open-loop point whose server answered clearly fewer requests inside the window than
    were scheduled in it."""
    scheduled, answered = point.get("scheduled") or 0, point.get("answered_in_window")
    if point["mode"] != "open" or answered is None or answered >= scheduled * (1 - OPEN_LOOP_SHORTFALL_WARN):
        return None
    return (
        f"{where}: {answered} answers arrived in the window for {scheduled} scheduled: the server fell behind at "
        "this rate (ok req/s counts only answers inside the window)"
    )

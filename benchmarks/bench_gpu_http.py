"""Routes/s through HTTP on one GPU with 1, 2, 4 ... Hypercorn worker processes (each its own batcher,
model and CUDA graphs), unique prompts, cache off, driven by ``benchmarks.loadgen`` (closed loop).

    python benchmarks/bench_gpu_http.py --workers 1 2 4 --out OUT/gpu-http.json

The server reads its model folder from ``LLMROUTER_MODEL_DIR`` like any deployment. Target (issue 4):
>= 30,000 routes/s with several workers on an H100; the best worker count is the one to document.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks.common import (  # noqa: E402
    ServerProcess,
    exit_on_sigterm,
    find_free_port,
    generate_prompts,
    machine_info,
    running_server,
)

TARGET_ROUTES_PER_S = 30_000
# Workers each load the model and capture graphs before /health turns 200.
HEALTH_TIMEOUT_S = 300.0
SERVER_FLAGS = ["--max-batch-size", "1024", "--max-batch-tokens", "65536", "--max-queue", "16384", "--cache-size", "0"]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4], help="worker counts to compare")
    parser.add_argument("--concurrency", type=int, default=512, help="requests in flight (closed loop)")
    parser.add_argument("--client-processes", type=int, default=6, help="load generator processes")
    parser.add_argument("--duration", type=float, default=15.0)
    parser.add_argument("--warmup", type=float, default=3.0)
    parser.add_argument("--prompts", type=int, default=400_000, help="distinct prompts (bodies) to cycle")
    parser.add_argument("--out", type=Path, required=True, help="JSON results (loadgen outputs beside it)")
    return parser.parse_args()


def measure(workers: int, bodies: Path, args: argparse.Namespace) -> dict[str, Any]:
    port = find_free_port()
    cmd = [sys.executable, "-m", "service", "serve-router", "--host", "127.0.0.1", "--port", str(port),
           "--workers", str(workers), *SERVER_FLAGS]  # fmt: skip
    log = args.out.parent / f"gpu-http-server-w{workers}.log"
    out = args.out.parent / f"gpu-http-loadgen-w{workers}.json"
    server = ServerProcess(cmd=cmd, base_url=f"http://127.0.0.1:{port}", log_path=log)
    with running_server(server, health_timeout_s=HEALTH_TIMEOUT_S):
        load = [sys.executable, "-m", "benchmarks.loadgen", "--url", f"{server.base_url}/v1/route",
                "--bodies", str(bodies), "--concurrency", str(args.concurrency), "--processes",
                str(args.client_processes), "--duration", str(args.duration), "--warmup", str(args.warmup),
                "--label", f"workers={workers}", "--out", str(out)]  # fmt: skip
        subprocess.run(load, cwd=REPO, check=True)
        with urllib.request.urlopen(f"{server.base_url}/health", timeout=10) as answer:
            health = json.loads(answer.read())
    result = json.loads(out.read_text())["result"]
    # what the server ran with (dtype, graphs captured, fused kernels, index backend): one worker's view
    server_view = {key: health.get(key) for key in ("device", "encoder", "index")}
    return {"workers": workers, "startup_s": server.startup_s, "ok_rps": result["ok_rps"],
            "status": result["status"], "latency_ms": result["latency_ms"],
            "client_cpu_cores": result["client_cpu_cores"], "server": server_view}  # fmt: skip


def device_name() -> str:
    import torch

    return str(torch.cuda.get_device_name())


def main() -> None:
    exit_on_sigterm()  # the device tool's time limit: the servers must not outlive the run on a warm GPU
    args = parse_args()
    import torch  # the servers import it again; here only to refuse a machine without CUDA

    if not torch.cuda.is_available():
        raise SystemExit("needs CUDA (on CPU it would run a long benchmark of nothing it measures)")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    bodies = args.out.parent / "gpu-http-bodies.jsonl"  # gpu.sh's archive leaves *.jsonl out
    bodies.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in generate_prompts(args.prompts, seed=1)))
    runs = []
    try:
        for workers in args.workers:
            try:
                runs.append(measure(workers, bodies, args))
            except Exception as exc:  # one failing configuration must not lose the others' numbers
                runs.append({"workers": workers, "error": str(exc)[-2000:]})
            print(json.dumps(runs[-1]), flush=True)
            # so far, rewritten after each run: one stopped by the call's time limit leaves the finished ones
            args.out.write_text(json.dumps({"partial": True, "runs": runs}, indent=1, default=str) + "\n")
    finally:  # also when the call's time limit stops the run (exit_on_sigterm raises SystemExit)
        bodies.unlink(missing_ok=True)
    ok = [r for r in runs if "ok_rps" in r]
    best = max(ok, key=lambda r: r["ok_rps"]) if ok else None
    device, machine = device_name(), machine_info()
    result = {"device": device, "machine": machine, "server_flags": SERVER_FLAGS,
              "client": {"concurrency": args.concurrency, "processes": args.client_processes,
                         "duration_s": args.duration, "warmup_s": args.warmup, "prompts": args.prompts},
              "runs": runs, "best_workers": best and best["workers"], "target_routes_per_s": TARGET_ROUTES_PER_S,
              "pass": bool(best and best["ok_rps"] >= TARGET_ROUTES_PER_S)}  # fmt: skip
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    lines = [f"Routes/s through HTTP on {device} (commit {machine.get('git_commit')}), unique prompts, "
             f"closed loop at {args.concurrency} in flight from {args.client_processes} client processes", "",
             "| workers | routes/s (2xx) | p50 ms | p99 ms | start-up s |",
             "| ---: | ---: | ---: | ---: | ---: |"]  # fmt: skip
    for r in runs:
        if "ok_rps" in r:
            lat = r["latency_ms"]
            lines.append(f"| {r['workers']} | {r['ok_rps']:,.0f} | {lat.get('p50')} | {lat.get('p99')} | "
                         f"{r['startup_s']:.0f} |")  # fmt: skip
        else:
            lines.append(f"| {r['workers']} | failed: {r['error'][:80]} | | | |")
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

"""How long the Redis store's ``load_stats`` takes with many requests waiting for a worker (a cold-start burst).

Starts a throwaway redis-server on a free port, answers ``--requests`` new routes "no ready worker" (no worker
registered), then times ``load_stats`` ``--calls`` times. Every replica runs it each ``--autoscale-interval-s``, and
Redis runs one script at a time: its time is every replica's routes' wait.

    python benchmarks/diagnostics/waiting_stats_cost.py --requests 100000
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the packages, from a plain checkout

from benchmarks.common import find_free_port
from service.dispatch.records import PickPolicy
from service.dispatch.redis_store import RedisStore

CONCURRENCY = 200
POLICY = PickPolicy(max_queue_time_s=30.0, heartbeat_timeout_s=60.0, request_ttl_s=600.0)
WINDOW_S = 60.0
STARTUP_S = 0.5


async def measure(url: str, requests: int, calls: int) -> None:
    store = RedisStore(url, prefix="waiting-cost:", max_open_requests=requests + 1)
    gate = asyncio.Semaphore(CONCURRENCY)

    async def route() -> None:
        async with gate:
            await store.route("ep", 1.0, None, POLICY)

    try:
        await asyncio.gather(*(route() for _ in range(requests)))
        for _ in range(calls):
            began = time.perf_counter()
            stats = await store.load_stats("ep", WINDOW_S)
            print(f"load_stats {1e3 * (time.perf_counter() - began):.1f} ms: {stats}")
    finally:
        await store.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=100_000, help="requests answered no ready worker first")
    parser.add_argument("--calls", type=int, default=3, help="load_stats calls timed")
    args = parser.parse_args()
    binary = shutil.which("redis-server")
    if binary is None:
        raise SystemExit("redis-server not found on PATH")
    port = find_free_port()
    redis = subprocess.Popen([binary, "--port", str(port), "--save", "", "--appendonly", "no"],
                             stdout=subprocess.DEVNULL)  # fmt: skip
    try:
        time.sleep(STARTUP_S)
        asyncio.run(measure(f"redis://127.0.0.1:{port}/0", args.requests, args.calls))
    finally:
        redis.terminate()
        redis.wait()


if __name__ == "__main__":
    main()

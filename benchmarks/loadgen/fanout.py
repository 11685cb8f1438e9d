"""One client process's part of a load-generator run, and the fan-out over several processes (spawned processes
import this module, not ``__main__``, so everything they run lives here)."""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import time
from typing import Any

import uvloop

from benchmarks.loadgen.aio import AiohttpClient
from benchmarks.loadgen.http1 import Http1Client
from benchmarks.loadgen.runner import Client, Plan, run_plan
from benchmarks.loadgen.stats import ProcessResult

# Time for P spawned processes to import and build their requests before the common start.
SPAWN_LEAD_S = 3.0
INPROCESS_LEAD_S = 0.2
RESULT_EXTRA_WAIT_S = 120.0  # on top of warm-up + duration + drain before a silent process counts as lost


def read_bodies(args: argparse.Namespace) -> list[bytes]:
    if args.body is not None:
        lines = [args.body.encode()]
    else:
        lines = [line for line in args.bodies.read_bytes().splitlines() if line.strip()]
    if not lines:
        raise SystemExit("no bodies")
    json.loads(lines[0])  # fail early on a file that is not JSON lines
    return lines


def share(total: float, parts: int, k: int) -> int:
    """Process k's share of an integer total, spread as evenly as possible."""
    whole = int(total)
    return whole // parts + (1 if k < whole % parts else 0)


def process_plan(args: argparse.Namespace, k: int, start_at: float) -> Plan:
    p = args.processes
    if args.concurrency is not None:
        return Plan("closed", args.warmup, args.duration, args.drain_timeout, concurrency=share(args.concurrency, p, k),
                    seed=args.seed, start_at=start_at)  # fmt: skip
    # P independent Poisson streams at rate/P add up to one Poisson stream at the full rate.
    return Plan("open", args.warmup, args.duration, args.drain_timeout, rate=args.rate / p,
                seed=args.seed * 1000 + k, start_at=start_at)  # fmt: skip


def make_client(kind: str, url: str, bodies: list[bytes], connections: int) -> Client:
    return AiohttpClient(url, bodies, connections) if kind == "aiohttp" else Http1Client(url, bodies, connections)


async def _run_async(kind: str, url: str, bodies: list[bytes], plan: Plan, connections: int) -> ProcessResult:
    client = make_client(kind, url, bodies, connections)
    try:
        return await run_plan(client, len(bodies), plan)
    finally:
        await client.aclose()


def run_process(args: argparse.Namespace, k: int, start_at: float) -> dict[str, Any]:
    """Process k's part of the run (also the entry point of spawned processes: each reads the bodies itself rather
    than receiving them through a pipe); JSON-safe result."""
    bodies = read_bodies(args)
    plan = process_plan(args, k, start_at)
    mine = bodies[k :: args.processes] if len(bodies) >= args.processes else bodies
    connections = plan.concurrency if plan.mode == "closed" else max(1, share(args.connections, args.processes, k))
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        result = runner.run(_run_async(args.client, args.url, mine, plan, connections))
    return result.to_dict()


def start_time(args: argparse.Namespace, lead_s: float) -> float:
    """The common start: ``--start-at`` when given (a process that started late reports ``late_start_s``)."""
    return args.start_at if args.start_at is not None else time.time() + lead_s


def run_all(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Every process's JSON-safe result; one process runs in this one, more are spawned and started together."""
    if args.processes == 1:
        return [run_process(args, 0, start_time(args, INPROCESS_LEAD_S))]
    start_at = start_time(args, SPAWN_LEAD_S)
    timeout = max(0.0, start_at - time.time()) + args.warmup + args.duration + args.drain_timeout + RESULT_EXTRA_WAIT_S
    with multiprocessing.get_context("spawn").Pool(args.processes) as pool:
        jobs = [pool.apply_async(run_process, (args, k, start_at)) for k in range(args.processes)]
        return [job.get(timeout=timeout) for job in jobs]

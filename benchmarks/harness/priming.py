"""The priming pass: every body of a scenario whose bodies repeat by design is sent once before its first point,
so every point (c=1 included) measures the cache hits the scenario claims. A time-based warm-up is not enough: at
c=1 a few seconds do not go through the bodies even once."""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import Any

from benchmarks.loadgen.http1 import Http1Client
from benchmarks.loadgen.stats import is_ok

PRIME_CONCURRENCY = 8  # enough to let the router batch; far below the queue limit
PRIME_TIMEOUT_S = 300.0


def prime(url: str, bodies: list[bytes], concurrency: int = PRIME_CONCURRENCY) -> dict[str, Any]:
    """Send each body once; returns how many were answered 2xx, by status and by exception."""
    return asyncio.run(asyncio.wait_for(_prime(url, bodies, concurrency), PRIME_TIMEOUT_S))


async def _prime(url: str, bodies: list[bytes], concurrency: int) -> dict[str, Any]:
    client = Http1Client(url, bodies, concurrency)
    status: Counter[int] = Counter()
    errors: Counter[str] = Counter()
    todo = iter(range(len(bodies)))  # shared by the workers: each body is taken once

    async def worker() -> None:
        for index in todo:
            try:
                status[(await client.send(index)).status] += 1
            except Exception as exc:  # counted, like the load generator's; the warning says so
                errors[type(exc).__name__] += 1

    try:
        await asyncio.gather(*(worker() for _ in range(concurrency)))
    finally:
        await client.aclose()
    return {
        "bodies": len(bodies),
        "ok": sum(n for code, n in status.items() if is_ok(code)),
        "status": {str(k): v for k, v in sorted(status.items())},
        "errors": dict(sorted(errors.items())),
    }

"""Diagnostic: microseconds per request body read under uvloop, with the body already there (the common case):
a plain read loop, the same loop under ``asyncio.timeout`` (a timer per request), and ``service.http.body``'s
``BodyReader`` (its content-type and size checks, the read, and a deadline table swept once a second). Why the
service bounds body reads with the table.

    python benchmarks/diagnostics/body_read_cost.py
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import uvloop

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the service package, from a plain checkout

from service.http.body import BodyReader

CALLS = 200_000
ROUNDS = 3
TIMEOUT_S = 30.0
BODY = b'{"endpoint": "bench", "cost": 100.0}'
MESSAGE = {"type": "http.request", "body": BODY, "more_body": False}
HEADERS = {b"content-type": b"application/json", b"content-length": str(len(BODY)).encode()}


async def receive() -> dict[str, Any]:
    return MESSAGE


async def plain() -> bytes:
    chunks = []
    while True:
        message = await receive()
        chunks.append(message["body"])
        if not message.get("more_body", False):
            return b"".join(chunks)


async def with_timer() -> bytes:
    async with asyncio.timeout(TIMEOUT_S):
        return await plain()


async def per_call_us(read: Callable[[], Awaitable[bytes]]) -> float:
    started = time.perf_counter()
    for _ in range(CALLS):
        await read()
    return (time.perf_counter() - started) / CALLS * 1e6


async def main() -> None:
    reader = BodyReader(max_bytes=1 << 20, timeout_s=TIMEOUT_S)
    for _ in range(ROUNDS):
        base = await per_call_us(plain)
        timer = await per_call_us(with_timer)
        table = await per_call_us(lambda: reader.read(HEADERS, receive))
        print(f"body read: plain {base:.2f} us, asyncio.timeout {timer:.2f} us, BodyReader {table:.2f} us", flush=True)


if __name__ == "__main__":
    uvloop.run(main())

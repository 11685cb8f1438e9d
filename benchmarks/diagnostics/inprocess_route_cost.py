"""Diagnostic: microseconds per request of the application alone (no HTTP server), in process: the dispatcher's
whole ASGI stack for ``POST /route/``, its handler alone, one Ed25519 signature, and the bare Starlette endpoint.

    python benchmarks/diagnostics/inprocess_route_cost.py
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "baselines"))
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the service package, from a plain checkout

import bare_echo

from service.config import DispatcherSettings
from service.dispatch.api import DispatcherApi
from service.dispatch.app import DispatcherService
from service.dispatch.endpoints import EndpointRegistry, EndpointSpec, hash_key
from service.dispatch.records import WorkerReport, WorkerState

CALLS = 10_000
ROUNDS = 3
BODY = orjson.dumps({"endpoint": "bench", "api_key": "k", "cost": 100.0})
HEADERS = [(b"content-type", b"application/json"), (b"content-length", str(len(BODY)).encode()), (b"host", b"x")]


async def call(app: Any, path: str) -> None:
    scope = {"type": "http", "method": "POST", "path": path, "raw_path": path.encode(), "query_string": b"",
             "headers": HEADERS, "http_version": "1.1", "scheme": "http", "server": ("127.0.0.1", 80),
             "client": ("127.0.0.1", 5), "root_path": "", "state": {}}  # fmt: skip

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": BODY, "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        return None

    await app(scope, receive, send)


async def per_call_us(fn: Callable[[], Awaitable[Any]], calls: int = CALLS) -> float:
    started = time.perf_counter()
    for _ in range(calls):
        await fn()
    return (time.perf_counter() - started) / calls * 1e6


async def main() -> None:
    registry = EndpointRegistry({"bench": EndpointSpec(name="bench", api_key_sha256=(hash_key("k"),))})
    service = DispatcherService(DispatcherSettings(), registry=registry)
    await service.store.report("bench", WorkerReport("w1", "http://127.0.0.1:9001", WorkerState.READY, 1e12))
    handler_headers = dict(HEADERS)
    api = DispatcherApi(service)
    message = b"x" * 220  # about a canonical assignment's size

    async def receive() -> dict[str, Any]:  # never read: /route/ does not watch for disconnects
        raise AssertionError("the handler read from the client")

    async def sign() -> None:
        service.signer.sign_bytes(message)

    for _ in range(ROUNDS):
        stack = await per_call_us(lambda: call(service.asgi, "/route/"))
        # the key in the body, none in the headers: nothing vouched for
        handler = await per_call_us(lambda: api.route(BODY, handler_headers, b"", receive, None))
        signature = await per_call_us(sign)
        bare = await per_call_us(lambda: call(bare_echo.app, "/echo"))
        print(f"dispatcher stack {stack:.1f} us, handler {handler:.1f} us, signature {signature:.1f} us; "
              f"bare Starlette {bare:.1f} us")  # fmt: skip


if __name__ == "__main__":
    asyncio.run(main())

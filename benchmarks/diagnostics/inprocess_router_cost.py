"""Diagnostic: microseconds per request of the router's application alone (no HTTP server), in process: its whole
ASGI stack for ``POST /v1/route`` with a supplied embedding and with a cached prompt, against the bare Starlette
endpoint on the same small body.

    python benchmarks/diagnostics/inprocess_router_cost.py
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import numpy as np
import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "baselines"))
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the service package, from a plain checkout

import bare_echo
from inprocess_route_cost import per_call_us  # a sibling script: its folder is first on sys.path

from service.config import RouterSettings
from service.router.app import RouterService

CALLS = 3_000
ROUNDS = 3
PROMPT = "how do I sort a list in python"


def asgi_call(app: Any, path: str, body: bytes) -> Callable[[], Awaitable[None]]:
    """One POST through ``app``; the client never disconnects (a second receive waits forever)."""
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), (b"host", b"x")]
    scope = {"type": "http", "method": "POST", "path": path, "raw_path": path.encode(), "query_string": b"",
             "headers": headers, "http_version": "1.1", "scheme": "http", "server": ("127.0.0.1", 80),
             "client": ("127.0.0.1", 5), "root_path": "", "state": {}}  # fmt: skip
    never = asyncio.Event()

    async def call() -> None:
        sent = False

        async def receive() -> dict[str, Any]:
            nonlocal sent
            if sent:
                await never.wait()
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}

        async def send(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start" and message["status"] != 200:
                raise RuntimeError(f"{path} answered {message['status']}")

        await app(dict(scope), receive, send)

    return call


async def main() -> None:
    service = RouterService(RouterSettings.from_env({}, compute_threads=1))
    await service._load()  # the lifespan's loading step, without a server around it
    assert service.engine is not None, service.load_error
    embedding = np.random.default_rng(0).standard_normal(384).tolist()
    with_embedding = asgi_call(service.asgi, "/v1/route", orjson.dumps({"embedding": embedding}))
    cached = asgi_call(service.asgi, "/v1/route", orjson.dumps({"prompt": PROMPT}))
    bare = asgi_call(bare_echo.app, "/echo", orjson.dumps({"prompt": PROMPT}))
    await cached()  # the first call embeds the prompt; every later one is a cache hit
    try:
        for _ in range(ROUNDS):
            e, c, b = (
                await per_call_us(with_embedding, CALLS),
                await per_call_us(cached, CALLS),
                await per_call_us(bare, CALLS),
            )
            print(f"router: embedding {e:.1f} us, cache hit {c:.1f} us; bare Starlette {b:.1f} us")
    finally:
        await service.engine.close()


if __name__ == "__main__":
    asyncio.run(main())

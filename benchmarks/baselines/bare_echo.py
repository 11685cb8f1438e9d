"""The HTTP ceiling: a bare Starlette app on Hypercorn (uvloop, one process) that parses a JSON body and answers
JSON. Every service benchmark compares against this in the same run.

    python benchmarks/baselines/bare_echo.py --port 9000
"""

from __future__ import annotations

import argparse
import asyncio

import orjson
import uvloop
from hypercorn.asyncio import serve
from hypercorn.config import Config
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route


async def echo(request: Request) -> Response:
    body = orjson.loads(await request.body())
    return Response(orjson.dumps({"ok": True, "echo": body}), media_type="application/json")


async def health(request: Request) -> Response:
    return Response(b'{"status":"ok"}', media_type="application/json")


app = Starlette(routes=[Route("/echo", echo, methods=["POST"]), Route("/health", health, methods=["GET"])])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9000)
    args = parser.parse_args()
    config = Config()
    config.bind = [f"{args.host}:{args.port}"]
    config.accesslog = None
    config.keep_alive_timeout = 75
    uvloop.run(serve(app, config))  # type: ignore[arg-type]


if __name__ == "__main__":
    asyncio.set_event_loop_policy(None)
    main()

"""The HTTP ceiling: a bare Starlette app on Hypercorn (uvloop, one process) that parses a JSON body and answers
JSON. Every service benchmark compares against this in the same run.

    python benchmarks/baselines/bare_echo.py --port 9000
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Callable
from pathlib import Path

import orjson
import uvloop
from hypercorn.asyncio import serve
from hypercorn.config import Config
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the service package, from a plain checkout

from service.config import BaseSettings
from service.http import hypercorn_keepalive, hypercorn_single_write
from service.http.server import ServiceConfig


async def echo(request: Request) -> Response:
    body = orjson.loads(await request.body())
    return Response(orjson.dumps({"ok": True, "echo": body}), media_type="application/json")


async def health(request: Request) -> Response:
    return Response(b'{"status":"ok"}', media_type="application/json")


app = Starlette(routes=[Route("/echo", echo, methods=["POST"]), Route("/health", health, methods=["GET"])])


def run(make_app: Callable[[], Starlette], *, default_port: int, description: str | None) -> None:
    """Serve an app the way every baseline does (one Hypercorn process on uvloop, no access log), after the
    command line is parsed: ``make_app`` may be slow (a model to load)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=default_port)
    parser.add_argument(
        "--service-keep-alive-timer",
        action="store_true",
        help="serve with the services' keep-alive timer (service/http/hypercorn_keepalive.py) instead of stock "
        "Hypercorn's: the HTTP layer the services run on, for comparison only (the targets' baseline is stock)",
    )
    parser.add_argument(
        "--service-single-write",
        action="store_true",
        help="write each answer of known length in one send and make the Date and Server headers once a second, as "
        "the services do (service/http/hypercorn_single_write.py, ServiceConfig): for comparison only, like "
        "--service-keep-alive-timer",
    )
    args = parser.parse_args()
    if args.service_keep_alive_timer:
        hypercorn_keepalive.install()
    if args.service_single_write:
        hypercorn_single_write.install()
    config = ServiceConfig() if args.service_single_write else Config()
    config.bind = [f"{args.host}:{args.port}"]
    config.accesslog = None
    config.keep_alive_timeout = 75
    config.backlog = BaseSettings.listen_backlog  # the services' own: the same kernel queue for new connections
    uvloop.run(serve(make_app(), config))  # type: ignore[arg-type]


def main() -> None:
    run(lambda: app, default_port=9000, description=__doc__)


if __name__ == "__main__":
    asyncio.set_event_loop_policy(None)
    main()

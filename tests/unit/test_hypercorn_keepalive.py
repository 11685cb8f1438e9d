"""The keep-alive timer the servers install into Hypercorn, served by a real Hypercorn worker on a free port."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from hypercorn.asyncio import tcp_server
from hypercorn.asyncio.run import worker_serve
from hypercorn.asyncio.worker_context import WorkerContext
from hypercorn.config import Config
from hypercorn.utils import wrap_app

from service.http import hypercorn_keepalive
from service.http.hypercorn_keepalive import KeepAliveTimer

REQUEST = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"
ANSWER = b'{"ok":true}'
WAIT_S = 10.0


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] != "http":
        return
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"11")]})
    await send({"type": "http.response.body", "body": ANSWER})


@asynccontextmanager
async def serving(keep_alive_s: float) -> AsyncIterator[tuple[int, asyncio.Event, asyncio.Task[None]]]:
    """A Hypercorn worker with the timer installed: (port, the event that shuts it down, its task)."""
    hypercorn_keepalive.install()
    config = Config()
    config.bind = ["127.0.0.1:0"]
    config.keep_alive_timeout = keep_alive_s
    config.graceful_timeout = WAIT_S
    config.accesslog = None
    sockets = config.create_sockets()
    port = sockets.insecure_sockets[0].getsockname()[1]
    stop = asyncio.Event()
    wrapped = wrap_app(app, config.wsgi_max_body_size, "asgi")
    task = asyncio.create_task(worker_serve(wrapped, config, sockets=sockets, shutdown_trigger=stop.wait))
    try:
        yield port, stop, task
    finally:
        stop.set()
        await asyncio.wait_for(task, WAIT_S)


async def connect(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A connection, once the worker listens (it starts listening after its lifespan start-up)."""
    deadline = time.monotonic() + WAIT_S
    while True:
        try:
            return await asyncio.open_connection("127.0.0.1", port)
        except ConnectionRefusedError:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.01)


async def ask(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    writer.write(REQUEST)
    async with asyncio.timeout(WAIT_S):  # no task of its own, unlike wait_for: the task count below is the server's
        head = await reader.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200")
        assert await reader.readexactly(len(ANSWER)) == ANSWER


async def closed_after(reader: asyncio.StreamReader) -> float:
    """Seconds until the server closes the connection (end of stream)."""
    started = time.monotonic()
    async with asyncio.timeout(WAIT_S):
        assert await reader.read() == b""
    return time.monotonic() - started


def test_install_gives_every_new_connection_the_timer_once() -> None:
    hypercorn_keepalive.install()
    init = tcp_server.TCPServer.__init__
    hypercorn_keepalive.install()
    assert tcp_server.TCPServer.__init__ is init


async def test_an_idle_connection_closes_after_the_keep_alive_and_requests_keep_it_open() -> None:
    keep_alive_s = 0.4
    async with serving(keep_alive_s) as (port, _, _):
        reader, writer = await connect(port)
        started = time.monotonic()
        while time.monotonic() - started < 3 * keep_alive_s:  # busy for longer than the keep-alive
            await ask(reader, writer)
            await asyncio.sleep(keep_alive_s / 4)
        await ask(reader, writer)
        idle_for = await closed_after(reader)
        assert keep_alive_s * 0.9 <= idle_for < keep_alive_s + 2.0
        writer.close()


async def test_requests_start_no_task_for_the_timer() -> None:
    """Hypercorn's own timer started two tasks per answer (``_idle_timeout`` and its ``wait_for``): only the
    application's task per request is left."""
    created = 0
    loop = asyncio.get_running_loop()

    def counting_factory(loop: asyncio.AbstractEventLoop, coro: Any, **kwargs: Any) -> asyncio.Task[Any]:
        nonlocal created
        created += 1
        return asyncio.Task(coro, loop=loop, **kwargs)

    async with serving(60.0) as (port, _, _):
        reader, writer = await connect(port)
        await ask(reader, writer)
        loop.set_task_factory(counting_factory)
        try:
            requests = 50
            for _ in range(requests):
                await ask(reader, writer)
        finally:
            loop.set_task_factory(None)
        assert created == requests  # Hypercorn's own timer: 3 per request
        writer.close()


async def test_a_connection_its_client_closed_is_released_at_once() -> None:
    async with serving(60.0) as (port, _, _):
        reader, writer = await connect(port)
        await ask(reader, writer)
        writer.write_eof()  # the client is done: its socket must not wait out the keep-alive (CLOSE-WAIT)
        assert await closed_after(reader) < 5.0
        writer.close()
        await asyncio.sleep(0.1)
        # nor does its timer keep the connection's objects until it fires
        assert [timer for idle in hypercorn_keepalive._WORKERS.values() for timer in idle.timers] == []


async def test_shutdown_closes_idle_connections_at_once() -> None:
    async with serving(60.0) as (port, stop, task):
        connections = [await connect(port) for _ in range(3)]
        for reader, writer in connections:
            await ask(reader, writer)
        started = time.monotonic()
        stop.set()
        for reader, writer in connections:
            await closed_after(reader)
            writer.close()
        await asyncio.wait_for(task, WAIT_S)
        assert time.monotonic() - started < 5.0  # not the 60 s keep-alive, nor the 10 s graceful timeout


async def test_expire_after_the_connection_is_gone_is_harmless() -> None:
    class FinishedTaskGroup:
        def spawn(self, *args: Any) -> None:
            raise RuntimeError("TaskGroup is finished")

    class Server:
        loop = asyncio.get_running_loop()
        context = WorkerContext(None)

        async def _initiate_server_close(self) -> None:  # pragma: no cover - never spawned
            raise AssertionError

    timer = KeepAliveTimer(Server())
    timer._task_group = FinishedTaskGroup()
    timer.expire()  # no exception out of a loop callback
    assert not timer.armed and not timer.idle
    await Server.context.terminated.set()  # ends the worker's watcher

"""The keep-alive timer the servers install into Hypercorn, served by a real Hypercorn worker on a free port."""

from __future__ import annotations

import asyncio
import gc
import logging
import time
import warnings
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any, cast

import h2.config
import h2.connection
import h2.events
import pytest
from hypercorn.asyncio import tcp_server
from hypercorn.asyncio.run import worker_serve
from hypercorn.asyncio.task_group import TaskGroup
from hypercorn.asyncio.worker_context import WorkerContext
from hypercorn.config import Config
from hypercorn.utils import wrap_app

from service.http import hypercorn_keepalive, hypercorn_patching
from service.http.hypercorn_keepalive import KeepAliveTimer

REQUEST = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"
ANSWER = b'{"ok":true}'
WAIT_S = 10.0


SLOW_PATH = "/slow"
SLOW_S = 1.2


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] != "http":
        return
    if scope["path"] == SLOW_PATH:
        await asyncio.sleep(SLOW_S)
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"11")]})
    await send({"type": "http.response.body", "body": ANSWER})


@asynccontextmanager
async def serving(
    keep_alive_s: float, graceful_s: float = WAIT_S
) -> AsyncIterator[tuple[int, asyncio.Event, asyncio.Task[None]]]:
    """A Hypercorn worker with the timer installed: (port, the event that shuts it down, its task)."""
    hypercorn_keepalive.install()
    config = Config()
    config.bind = ["127.0.0.1:0"]
    config.keep_alive_timeout = keep_alive_s
    config.graceful_timeout = graceful_s
    config.accesslog = None
    sockets = config.create_sockets()
    port = sockets.insecure_sockets[0].getsockname()[1]
    stop = asyncio.Event()
    wrapped = wrap_app(cast(Any, app), config.wsgi_max_body_size, "asgi")
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


async def ask(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, path: str = "/") -> None:
    writer.write(REQUEST.replace(b" / ", f" {path} ".encode()))
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


def test_install_is_idempotent() -> None:
    hypercorn_keepalive.install()
    init = tcp_server.TCPServer.__init__
    hypercorn_keepalive.install()
    assert tcp_server.TCPServer.__init__ is init


def test_a_hypercorn_without_the_timer_it_replaces_keeps_its_own(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    class OtherTCPServer:
        def __init__(self) -> None:
            self.idle_task = "its own"

    monkeypatch.setattr(tcp_server, "TCPServer", OtherTCPServer)
    with caplog.at_level(logging.WARNING, logger=hypercorn_patching.__name__):
        hypercorn_keepalive.install()
    assert OtherTCPServer().idle_task == "its own"
    assert "lacks _initiate_server_close, _idle_timeout" in caplog.text and "its own is kept" in caplog.text


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


async def test_an_idle_connection_closes_a_keep_alive_after_its_last_answer() -> None:
    """The handle armed when the connection opened fires while it has been idle for less than the keep-alive: it
    waits out the rest, no more (re-armed for a whole keep-alive, it would close up to twice as late)."""
    keep_alive_s = 1.0
    async with serving(keep_alive_s) as (port, _, _):
        opened = time.monotonic()
        reader, writer = await connect(port)
        await asyncio.sleep(0.3 * keep_alive_s)
        await ask(reader, writer)  # idle again from about 0.3 keep-alives on
        await closed_after(reader)
        assert 1.2 * keep_alive_s <= time.monotonic() - opened < 1.7 * keep_alive_s
        writer.close()


async def test_a_request_longer_than_the_keep_alive_is_not_cut() -> None:
    keep_alive_s = SLOW_S / 3
    async with serving(keep_alive_s) as (port, _, _):
        reader, writer = await connect(port)
        await ask(reader, writer, SLOW_PATH)  # the handle fires twice or more while it runs
        await ask(reader, writer)  # and the connection is still open after
        assert await closed_after(reader) >= 0.9 * keep_alive_s
        writer.close()


async def test_requests_arm_no_timer_of_their_own() -> None:
    """A request or an answer only notes the time: re-arming a handle for each cost about 8 us per request."""
    loop = asyncio.get_running_loop()
    armed = 0
    call_later = loop.call_later

    def counting_call_later(delay: float, callback: Any, *args: Any, **kwargs: Any) -> asyncio.TimerHandle:
        nonlocal armed
        armed += getattr(callback, "__self__", None).__class__ is KeepAliveTimer
        return call_later(delay, callback, *args, **kwargs)

    async with serving(60.0) as (port, _, _):
        reader, writer = await connect(port)
        await ask(reader, writer)
        loop.call_later = counting_call_later  # type: ignore[method-assign,assignment]
        try:
            for _ in range(50):
                await ask(reader, writer)
        finally:
            del loop.call_later
        assert armed == 0  # the handle armed when the connection opened is still the one
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


async def test_an_answer_finished_during_shutdown_closes_its_connection_at_once() -> None:
    """Hypercorn's timer closed a connection that went idle once the worker was terminating; so does this one."""
    async with serving(60.0, graceful_s=3 * WAIT_S) as (port, stop, task):
        reader, writer = await connect(port)
        slow = asyncio.create_task(ask(reader, writer, SLOW_PATH))
        await asyncio.sleep(SLOW_S / 3)  # the request is in flight
        stop.set()
        await slow  # answered in full
        assert await closed_after(reader) < 3.0  # not the 60 s keep-alive, nor the 30 s graceful timeout
        writer.close()
        await asyncio.wait_for(task, WAIT_S)


async def test_an_http2_stream_finished_during_shutdown_closes_its_connection_at_once() -> None:
    """HTTP/2 (h2c, prior knowledge): the connection goes idle as its last stream ends, after the worker began to
    terminate, and closes then (Hypercorn's HTTP/1 path closes such a connection itself)."""
    async with serving(60.0, graceful_s=3 * WAIT_S) as (port, stop, _):
        reader, writer = await connect(port)
        client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        client.initiate_connection()
        headers = [(":method", "GET"), (":path", SLOW_PATH), (":scheme", "http"), (":authority", "x")]
        client.send_headers(1, headers, end_stream=True)
        writer.write(client.data_to_send())
        await asyncio.sleep(SLOW_S / 3)  # the stream is in flight
        stop.set()
        ended: float | None = None
        async with asyncio.timeout(WAIT_S):  # not the 30 s graceful timeout
            while data := await reader.read(65536):
                for event in client.receive_data(data):
                    if isinstance(event, h2.events.StreamEnded):
                        ended = time.monotonic()
                writer.write(client.data_to_send())
        assert ended is not None and time.monotonic() - ended < 3.0
        writer.close()


async def test_expire_after_the_connection_is_gone_is_harmless() -> None:
    """A connection whose task group has finished (the watcher can reach one that is closing): no exception out of
    a loop callback, and no coroutine left unawaited."""
    group = TaskGroup(asyncio.get_running_loop())
    async with group:
        pass

    class Writer:
        def is_closing(self) -> bool:
            return False

    class Server:
        loop = asyncio.get_running_loop()
        context = WorkerContext(None)
        writer = Writer()

        async def _initiate_server_close(self) -> None:  # pragma: no cover - never run
            raise AssertionError

    timer = KeepAliveTimer(Server())
    timer._task_group = group
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        timer.expire()
        gc.collect()
    assert [str(w.message) for w in caught] == []
    assert not timer.armed and not timer.idle
    await Server.context.terminated.set()  # ends the worker's watcher

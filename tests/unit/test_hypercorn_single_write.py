"""One socket write per HTTP/1 answer of known length, served by a real Hypercorn worker on a free port."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any, cast

import pytest
from hypercorn.asyncio import tcp_server
from hypercorn.asyncio.run import worker_serve
from hypercorn.config import Config
from hypercorn.events import RawData
from hypercorn.protocol import h11 as hypercorn_h11
from hypercorn.utils import wrap_app

from service.http import hypercorn_patching, hypercorn_single_write
from tests.unit.test_hypercorn_keepalive import connect

ANSWER = b'{"ok":true}'
BIG = b"x" * (hypercorn_single_write.MAX_JOINED_BYTES + 1000)
CHUNK = b"first chunk"
# Streamed answers by path: no Content-Length, or one with a Transfer-Encoding (which h11 then frames by, chunked)
STREAMED = {
    "/stream": [],
    "/stream-with-length": [(b"content-length", b"11"), (b"transfer-encoding", b"chunked")],
}
WAIT_S = 10.0


class Harness:
    """The app's paths, and what the test holds them with."""

    def __init__(self) -> None:
        self.release_stream = asyncio.Event()
        self.send_errors: list[Exception] = []

    async def app(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "websocket":  # accepted (a 101), then held open until the test lets go
            assert (await receive())["type"] == "websocket.connect"
            await send({"type": "websocket.accept"})
            await self.release_stream.wait()
            await send({"type": "websocket.close"})
            return
        if scope["type"] != "http":
            return
        path = scope["path"]
        if path in STREAMED:  # its head must not wait for the chunk
            await send({"type": "http.response.start", "status": 200, "headers": STREAMED[path]})
            await self.release_stream.wait()
            await send({"type": "http.response.body", "body": CHUNK, "more_body": True})
            await send({"type": "http.response.body", "body": b""})
            return
        if path == "/fail":  # starts a sized answer, then fails before its body
            await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"11")]})
            raise RuntimeError("the app failed mid-answer")
        if path == "/too-long":  # more body than its Content-Length: h11 refuses it, and the app is told
            await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
            try:
                await send({"type": "http.response.body", "body": ANSWER})
            except Exception as exc:
                self.send_errors.append(exc)
            return
        if path == "/empty":
            await send({"type": "http.response.start", "status": 204, "headers": [(b"content-length", b"0")]})
            await send({"type": "http.response.body", "body": b""})
            return
        if path == "/continue":  # reads the body a client sends only after "100 Continue"
            body = b""
            while True:
                message = await receive()
                body += message.get("body", b"")
                if not message.get("more_body"):
                    break
            answer = body
        else:
            answer = BIG if path == "/big" else ANSWER
        name = b"Content-Length" if path == "/capitalised" else b"content-length"  # ASGI asks for lower case only
        await send({"type": "http.response.start", "status": 200, "headers": [(name, str(len(answer)).encode())]})
        await send({"type": "http.response.body", "body": answer})


@asynccontextmanager
async def serving(harness: Harness) -> AsyncIterator[int]:
    hypercorn_single_write.install()
    config = Config()
    config.bind = ["127.0.0.1:0"]
    config.accesslog = None
    config.graceful_timeout = WAIT_S
    sockets = config.create_sockets()
    port = sockets.insecure_sockets[0].getsockname()[1]
    stop = asyncio.Event()
    wrapped = wrap_app(cast(Any, harness.app), config.wsgi_max_body_size, "asgi")
    task = asyncio.create_task(worker_serve(wrapped, config, sockets=sockets, shutdown_trigger=stop.wait))
    try:
        yield port
    finally:
        stop.set()
        await asyncio.wait_for(task, WAIT_S)


def request(method: str, path: str, extra: bytes = b"") -> bytes:
    return f"{method} {path} HTTP/1.1\r\nHost: x\r\n".encode() + extra + b"\r\n"


async def answer(reader: asyncio.StreamReader, *, has_body: bool = True) -> tuple[bytes, bytes]:
    """One response: (its head, its body, read by its Content-Length)."""
    async with asyncio.timeout(WAIT_S):
        head = await reader.readuntil(b"\r\n\r\n")
        length = next(
            int(line.split(b":", 1)[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length:")
        )
        return head, await reader.readexactly(length) if has_body else b""


async def read_to_close(reader: asyncio.StreamReader) -> bytes:
    async with asyncio.timeout(WAIT_S):
        received = await reader.read()
        while chunk := await reader.read():
            received += chunk
    return received


async def head_while_held(reader: asyncio.StreamReader, harness: Harness) -> bytes:
    """A response head read while the app still waits on ``release_stream`` (then let go, whatever came)."""
    try:
        async with asyncio.timeout(WAIT_S):
            return await reader.readuntil(b"\r\n\r\n")
    finally:
        harness.release_stream.set()


@pytest.fixture
def writes(monkeypatch: pytest.MonkeyPatch) -> list[bytes]:
    """Every chunk of bytes a connection hands its socket writer."""
    sent: list[bytes] = []
    original = tcp_server.TCPServer.protocol_send

    async def recording(self: Any, event: Any) -> None:
        if isinstance(event, RawData):
            sent.append(event.data)
        await original(self, event)

    monkeypatch.setattr(tcp_server.TCPServer, "protocol_send", recording)
    return sent


async def test_an_answer_of_known_length_is_one_write(writes: list[bytes]) -> None:
    async with serving(Harness()) as port:
        reader, writer = await connect(port)
        for _ in range(3):  # on one keep-alive connection
            writes.clear()
            writer.write(request("GET", "/"))
            head, body = await answer(reader)
            assert head.startswith(b"HTTP/1.1 200") and body == ANSWER
            assert writes == [head + body]  # Hypercorn alone: head, body and an empty end of message
        writer.close()


async def test_pipelined_requests_get_their_answers_in_order(writes: list[bytes]) -> None:
    async with serving(Harness()) as port:
        reader, writer = await connect(port)
        writer.write(request("GET", "/") + request("GET", "/empty") + request("GET", "/"))
        assert (await answer(reader))[1] == ANSWER
        head, body = await answer(reader)
        assert head.startswith(b"HTTP/1.1 204") and body == b""
        assert (await answer(reader))[1] == ANSWER
        assert len(writes) == 3
        writer.close()


async def test_a_head_request_gets_the_head_alone_and_the_connection_stays_usable(writes: list[bytes]) -> None:
    async with serving(Harness()) as port:
        reader, writer = await connect(port)
        writer.write(request("HEAD", "/"))
        head, _ = await answer(reader, has_body=False)
        assert head.startswith(b"HTTP/1.1 200") and b"content-length: 11" in head
        assert writes == [head]
        writer.write(request("GET", "/"))  # no stray body bytes were sent: the next answer parses
        assert (await answer(reader))[1] == ANSWER
        writer.close()


@pytest.mark.parametrize("path", list(STREAMED))
async def test_a_streamed_answer_sends_its_head_before_its_first_chunk(path: str) -> None:
    harness = Harness()
    async with serving(harness) as port:
        reader, writer = await connect(port)
        writer.write(request("GET", path))
        head = await head_while_held(reader, harness)
        assert head.startswith(b"HTTP/1.1 200") and b"transfer-encoding: chunked" in head.lower()
        async with asyncio.timeout(WAIT_S):
            assert await reader.readuntil(b"0\r\n\r\n") == b"%x\r\n%s\r\n0\r\n\r\n" % (len(CHUNK), CHUNK)
        writer.close()


async def test_a_capitalised_content_length_is_one_write_too(writes: list[bytes]) -> None:
    async with serving(Harness()) as port:
        reader, writer = await connect(port)
        writer.write(request("GET", "/capitalised"))
        head, body = await answer(reader)
        assert body == ANSWER and writes == [head + body]
        writer.close()


async def test_a_body_longer_than_its_length_is_refused_to_the_app() -> None:
    harness = Harness()
    async with serving(harness) as port:
        reader, writer = await connect(port)
        writer.write(request("GET", "/too-long"))
        received = await read_to_close(reader)
        assert received.startswith(b"HTTP/1.1 200") and received.endswith(b"\r\n\r\n")  # the head, then the close
        assert [type(exc).__name__ for exc in harness.send_errors] == ["LocalProtocolError"]
        writer.close()


async def test_a_websocket_accept_101_is_not_held() -> None:
    """A 101 is followed by WebSocket frames written past h11: held, it would never be written at all."""
    harness = Harness()
    upgrade = b"Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
    async with serving(harness) as port:
        reader, writer = await connect(port)
        writer.write(request("GET", "/ws", upgrade + b"Sec-WebSocket-Version: 13\r\n"))
        head = await head_while_held(reader, harness)  # the app holds the socket open: only the 101 can have come
        assert head.startswith(b"HTTP/1.1 101")
        writer.close()


async def test_an_interim_100_continue_is_not_held() -> None:
    async with serving(Harness()) as port:
        reader, writer = await connect(port)
        writer.write(request("POST", "/continue", b"Content-Length: 5\r\nExpect: 100-continue\r\n"))
        async with asyncio.timeout(WAIT_S):  # the body is sent only after this
            assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 100")
        writer.write(b"hello")
        assert (await answer(reader))[1] == b"hello"
        writer.close()


async def test_a_head_whose_body_never_comes_is_written_before_the_close() -> None:
    """The app failed after starting a sized answer: the client gets the head, then the close, as from Hypercorn
    alone (which wrote the head at once)."""
    async with serving(Harness()) as port:
        reader, writer = await connect(port)
        writer.write(request("GET", "/fail"))
        received = await read_to_close(reader)
        assert received.startswith(b"HTTP/1.1 200") and received.endswith(b"\r\n\r\n")
        writer.close()


async def test_a_large_body_follows_its_head_in_a_write_of_its_own(writes: list[bytes]) -> None:
    async with serving(Harness()) as port:
        reader, writer = await connect(port)
        writer.write(request("GET", "/big"))
        head, body = await answer(reader)
        assert body == BIG
        assert writes == [head, BIG]  # not copied into one buffer with its head
        writer.close()


def test_install_is_idempotent() -> None:
    hypercorn_single_write.install()
    send_event = hypercorn_h11.H11Protocol._send_h11_event
    recycle = hypercorn_h11.H11Protocol._maybe_recycle
    hypercorn_single_write.install()
    assert hypercorn_h11.H11Protocol._send_h11_event is send_event
    assert hypercorn_h11.H11Protocol._maybe_recycle is recycle


def test_a_hypercorn_without_what_it_replaces_keeps_its_own_writes(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    class OtherH11Protocol:
        async def _send_h11_event(self, event: Any) -> None:
            return None

    monkeypatch.setattr(hypercorn_h11, "H11Protocol", OtherH11Protocol)
    with caplog.at_level(logging.WARNING, logger=hypercorn_patching.__name__):
        hypercorn_single_write.install()
    assert OtherH11Protocol._send_h11_event.__module__ == __name__
    assert "lacks _maybe_recycle" in caplog.text and "its own is kept" in caplog.text

"""A lean HTTP/1.1 keep-alive client for POSTing JSON: one request in flight per connection, responses framed by
``Content-Length`` (or chunked), bytes built once per body. It does a small fraction of aiohttp's per-request work,
so one client process drives a single-process server to saturation (see benchmarks/README.md)."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Sequence
from urllib.parse import urlsplit

from benchmarks.loadgen.timing import Answer, now

_HEADER_END = b"\r\n\r\n"
_CHUNKED_END = b"0\r\n\r\n"
_CONTENT_LENGTH = re.compile(rb"\r\ncontent-length:[ \t]*(\d+)", re.IGNORECASE)
_CHUNKED = re.compile(rb"\r\ntransfer-encoding:[ \t]*chunked", re.IGNORECASE)
_CONNECTION_CLOSE = re.compile(rb"\r\nconnection:[ \t]*close", re.IGNORECASE)


class ProtocolError(Exception):
    """The server's answer is not HTTP/1.1 we can frame."""


class ConnectionClosed(ConnectionError):
    """The server closed the connection before the whole answer arrived."""


def build_request(host: str, port: int, path: str, body: bytes) -> bytes:
    head = (
        f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    )
    return head.encode("ascii") + body


class _Connection(asyncio.Protocol):
    """One keep-alive connection; ``request`` sends prebuilt bytes and resolves to (status, body bytes)."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self._buf = bytearray()
        self._waiter: asyncio.Future[tuple[int, int]] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's transports do not subclass asyncio's

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_exception(exc or ConnectionClosed("server closed the connection"))

    def data_received(self, data: bytes) -> None:
        self._buf += data
        if self._waiter is not None and not self._waiter.done():
            try:
                answer = self._parse()
            except ProtocolError as exc:
                self._waiter.set_exception(exc)
                return
            if answer is not None:
                self._waiter.set_result(answer)

    def _parse(self) -> tuple[int, int] | None:
        buf = self._buf
        head_end = buf.find(_HEADER_END)
        if head_end < 0:
            return None
        head = bytes(buf[:head_end])
        if not head.startswith(b"HTTP/1."):
            raise ProtocolError(f"not an HTTP/1.x status line: {head[:40]!r}")
        status = int(head[9:12])
        body_start = head_end + len(_HEADER_END)
        match = _CONTENT_LENGTH.search(head)
        if match is not None:
            end = body_start + int(match.group(1))
            if len(buf) < end:
                return None
        elif _CHUNKED.search(head):
            # Our servers answer small JSON; the body never contains the last-chunk marker itself.
            marker = buf.find(_CHUNKED_END, body_start)
            if marker < 0:
                return None
            end = marker + len(_CHUNKED_END)
        else:
            raise ProtocolError("answer has neither Content-Length nor chunked encoding")
        if _CONNECTION_CLOSE.search(head):
            self.closed = True  # the pool opens a new one for the next request
        del buf[:end]
        return status, end - body_start

    async def request(self, raw: bytes) -> tuple[int, int]:
        assert self.transport is not None
        self._waiter = asyncio.get_running_loop().create_future()
        self.transport.write(raw)
        try:
            return await self._waiter
        finally:
            self._waiter = None

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


class ConnectionPool:
    """Up to ``size`` connections to one host; idle ones are reused last-in first-out, so at a low open-loop rate
    few connections carry the traffic and stay warm instead of idling into the server's keep-alive timeout."""

    def __init__(self, host: str, port: int, size: int) -> None:
        self.host, self.port, self.size = host, port, size
        self.opened = 0
        self._idle: list[_Connection] = []
        self._slots = asyncio.Semaphore(size)

    async def _connect(self) -> _Connection:
        loop = asyncio.get_running_loop()
        _, conn = await loop.create_connection(_Connection, self.host, self.port)
        self.opened += 1
        return conn

    async def request(self, raw: bytes) -> Answer:
        """Send one prebuilt request on an idle (or new) connection; a broken connection is dropped, not reused."""
        async with self._slots:
            sent_at = now()
            conn = None
            while self._idle:
                candidate = self._idle.pop()
                if not candidate.closed:
                    conn = candidate
                    break
            if conn is None:
                conn = await self._connect()
            ok = False
            try:
                status, nbytes = await conn.request(raw)
                ok = True
                return Answer(status, nbytes, sent_at)
            finally:
                if ok and not conn.closed:
                    self._idle.append(conn)
                else:
                    conn.close()

    def close(self) -> None:
        for conn in self._idle:
            conn.close()
        self._idle.clear()


class Http1Client:
    """POSTs ``bodies[i]`` to ``url`` over a :class:`ConnectionPool`; every request's bytes are built up front."""

    def __init__(self, url: str, bodies: Sequence[bytes], connections: int) -> None:
        parts = urlsplit(url)
        if parts.scheme != "http" or parts.hostname is None:
            raise ValueError(f"only plain http:// URLs are supported: {url}")
        port = parts.port or 80
        # The request target keeps the query (e.g. ?api-version=2): dropping it would hit another resource.
        path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        self._raw = [build_request(parts.hostname, port, path, body) for body in bodies]
        self._pool = ConnectionPool(parts.hostname, port, connections)

    @property
    def connections_opened(self) -> int:
        return self._pool.opened

    async def send(self, index: int) -> Answer:
        return await self._pool.request(self._raw[index])

    async def aclose(self) -> None:
        self._pool.close()

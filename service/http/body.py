"""Reading a JSON request body within limits: its content type, its size (413) and the time it takes to arrive (408).

Without a deadline a client that sends its headers and then stalls (or trickles) the body holds its connection,
and a file descriptor, for ever: Hypercorn's keep-alive timer stops once the headers are in, and its read timeout
would also cut requests that are merely slow to answer. A timer per request costs 7-11 µs under uvloop
(``benchmarks/diagnostics/body_read_cost.py``), a few percent of a whole ``/route/``, so reads register their task
in a table instead and one sweep a second cancels the reads that ran past their deadline (a deadline is thus kept
to within ``SWEEP_S``).

The bodies being read are held in memory until whole, and those of all connections together are bounded too
(``max_buffered_bytes``): one client without any credential, stalling a thousand 1 MiB bodies just short of their
end, held 1.4 GB of the dispatcher's memory (16 MiB bodies: 1.7 GB of a worker's for 100 connections). Past the
budget a body is refused with 429 and Retry-After.

Reads a caller marks untrusted (``trusted=False``: the dispatcher's, where no known key came in the headers or the
query string) are also bounded apart, by a smaller share of that budget (``max_untrusted_bytes``): about 64 stalled
bodies without any credential otherwise filled the whole budget, and every keyed ``/route/`` got 429 until they
timed out. Callers that do not tell (the router: it takes no credential) read against the whole budget alone.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping
from typing import Any

from starlette.requests import ClientDisconnect, Request
from starlette.types import Receive

from service.errors import (
    InvalidRequest,
    Overloaded,
    PayloadTooLarge,
    RequestTimeout,
    ServiceError,
    UnsupportedMediaType,
)

SWEEP_S = 1.0
# A body may arrive in at most max(MIN_BODY_PIECES, max_bytes // MIN_PIECE_BYTES) ASGI messages. Each costs ~17 µs of
# parsing however small: a 1 MiB body sent in 1-byte chunks cost 16 s of CPU in one request, before any key was
# checked. Real clients send a socket read's worth (KBs) per message.
MIN_BODY_PIECES = 64
MIN_PIECE_BYTES = 256
DEFAULT_BUFFERED_BODIES = 64  # the default budget of all bodies being read at once, in bodies of the largest size
# The default share of that budget that untrusted reads may hold together: a stalling crowd without any key leaves
# the rest (48 of the default 64 bodies) to keyed clients, and real bodies (a /route/ is ~100 bytes) need far less.
DEFAULT_UNTRUSTED_SHARE = 0.25
# The key in a header is what moves a body to the trusted budget: said, so that a client keying in the body knows
UNTRUSTED_OVERLOADED = (
    "over {} bytes of request bodies without a known key in their headers are being read; retry, or send the key as"
    " 'Authorization: Bearer'"
)


class BodyReader:
    """One per app: ``max_bytes`` and ``timeout_s`` (the whole body, from the first ``receive``), at most
    ``max_buffered_bytes`` of all the bodies being read at once (default: 64 bodies of ``max_bytes``), and of those at
    most ``max_untrusted_bytes`` read untrusted (default: a quarter of ``max_buffered_bytes``, at least one body of
    ``max_bytes``; never more than ``max_buffered_bytes``). Untrusted bytes count against both budgets, so the memory
    held stays within ``max_buffered_bytes`` and trusted reads always have the difference to themselves."""

    def __init__(
        self,
        *,
        max_bytes: int,
        timeout_s: float,
        max_buffered_bytes: int | None = None,
        max_untrusted_bytes: int | None = None,
    ) -> None:
        self.max_bytes = max_bytes
        self.timeout_s = timeout_s
        self.max_buffered_bytes = max_buffered_bytes or DEFAULT_BUFFERED_BODIES * max_bytes
        untrusted = max_untrusted_bytes or max(max_bytes, int(self.max_buffered_bytes * DEFAULT_UNTRUSTED_SHARE))
        self.max_untrusted_bytes = min(untrusted, self.max_buffered_bytes)
        self._buffered = 0  # bytes of the bodies being read now
        self._untrusted = 0  # of which read untrusted
        self.max_pieces = max(MIN_BODY_PIECES, max_bytes // MIN_PIECE_BYTES)
        self._deadlines: dict[asyncio.Task[Any], float] = {}  # reads in progress
        self._expired: set[asyncio.Task[Any]] = set()
        # the loop a sweep is scheduled on, None when none is: a sweep stops once no read is in progress (a closed
        # loop's never comes: tests run one app on several loops in turn)
        self._sweep_loop: asyncio.AbstractEventLoop | None = None

    async def read_request(self, request: Request, *, trusted: bool = True) -> bytes:
        return await self.read(dict(request.scope["headers"]), request.receive, trusted=trusted)

    async def read(self, headers: Mapping[bytes, bytes], receive: Receive, *, trusted: bool = True) -> bytes:
        """The raw body (ASGI's lower-cased header names), refusing non-JSON content types, bodies over
        ``max_bytes`` and bodies slower than ``timeout_s``; ``ClientDisconnect`` if the client leaves first.
        ``trusted=False``: the body also counts against ``max_untrusted_bytes``."""
        content_type = headers.get(b"content-type", b"application/json").split(b";")[0].strip().lower()
        if content_type != b"application/json" and not content_type.endswith(b"+json"):
            raise _unread(
                UnsupportedMediaType(f"content type must be application/json, got {content_type.decode('latin-1')!r}")
            )
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            raise _unread(PayloadTooLarge(f"body of {declared.decode()} bytes is over the {self.max_bytes}-byte limit"))
        task = asyncio.current_task()
        assert task is not None
        self._deadlines[task] = time.monotonic() + self.timeout_s
        if self._sweep_loop is None or self._sweep_loop.is_closed():
            self._arm(task.get_loop())
        size = 0
        try:
            chunks: list[bytes] = []
            while True:
                message = await receive()
                if message["type"] != "http.request":
                    raise ClientDisconnect()
                chunk = message.get("body", b"")
                size += len(chunk)
                self._buffered += len(chunk)
                if not trusted:
                    self._untrusted += len(chunk)
                if size > self.max_bytes:
                    raise _unread(PayloadTooLarge(f"body is over the {self.max_bytes}-byte limit"))
                if self._buffered > self.max_buffered_bytes:
                    raise _unread(
                        Overloaded(f"over {self.max_buffered_bytes} bytes of request bodies are being read; retry")
                    )
                if not trusted and self._untrusted > self.max_untrusted_bytes:
                    raise _unread(Overloaded(UNTRUSTED_OVERLOADED.format(self.max_untrusted_bytes)))
                chunks.append(chunk)
                if len(chunks) > self.max_pieces:
                    raise _unread(
                        InvalidRequest(f"body sent in over {self.max_pieces} pieces; send it in larger chunks")
                    )
                if not message.get("more_body", False):
                    return chunks[0] if len(chunks) == 1 else b"".join(chunks)
        except asyncio.CancelledError:
            if task not in self._expired:
                raise
            task.uncancel()
            raise _unread(RequestTimeout(f"the request body did not arrive within {self.timeout_s:g} s")) from None
        finally:
            self._buffered -= size
            if not trusted:
                self._untrusted -= size
            self._deadlines.pop(task, None)
            if self._expired:
                self._expired.discard(task)

    def _arm(self, loop: asyncio.AbstractEventLoop) -> None:
        self._sweep_loop = loop
        loop.call_later(SWEEP_S, self._cancel_expired)

    def _cancel_expired(self) -> None:
        now = time.monotonic()
        for task, deadline in list(self._deadlines.items()):
            if deadline <= now:
                del self._deadlines[task]
                self._expired.add(task)
                task.cancel()
        loop, self._sweep_loop = self._sweep_loop, None
        if self._deadlines and loop is not None:
            self._arm(loop)


def _unread(error: ServiceError) -> ServiceError:
    """Answered before the body was read to its end: the connection cannot carry another request."""
    error.close_connection = True
    return error

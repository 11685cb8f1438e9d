"""One socket write per HTTP/1 answer of known length, installed by the servers: the head waits for the body.

Hypercorn (0.17, 0.18) writes an HTTP/1 response in three sends through the connection (``TCPServer.protocol_send``,
each under its send lock, with a ``drain``): the head, the body, and the empty end of message. For a small JSON
answer that is two ``send`` system calls and three trips through the lock where one of each does. So here the head
of a response that says its length (``Content-Length``) is held until its body comes and leaves in the same write,
and an empty write is not made at all.

What is kept: a streamed response (no ``Content-Length``, or a ``Transfer-Encoding`` beside it: chunked, or ended
by closing) sends its head at once, as Hypercorn does, so a client sees it before the first chunk; informational
responses (100, 101) are never held; a head whose body never comes (the app failed after starting its answer) is
written when the stream closes, before the connection is closed, as Hypercorn would have written it earlier. A body
larger than ``MAX_JOINED_BYTES`` is written after the head rather than copied into one buffer with it.

What differs, besides the writes: an answer that says its length but sends its body later, or in pieces (a file, a
proxied upstream), sends its head with its first piece rather than at once. And where Hypercorn closes a connection
on its own between an answer's head and its body (the client sent a malformed request body, or half-closed its side,
while the app had started but not finished its answer), the client gets no bytes instead of a bare head: a failed
answer either way. The services' handlers send a head and its body with nothing awaited in between.
"""

from __future__ import annotations

from typing import Any

import h11
from hypercorn.events import RawData
from hypercorn.protocol import h11 as hypercorn_h11

from service.http.hypercorn_patching import should_patch

_INSTALLED = "_service_single_write"
# Past this a body is not copied to join its head: one more send costs less than copying that much.
MAX_JOINED_BYTES = 64 * 1024
_CONTENT_LENGTH = b"content-length"
_TRANSFER_ENCODING = b"transfer-encoding"
# What this replaces on Hypercorn's H11Protocol; without one of them, Hypercorn's own writes are left in place.
_PROTOCOL_ATTRIBUTES = ("_send_h11_event", "_maybe_recycle")


def _sized(response: h11.Response) -> bool:
    """Whether h11 frames this answer by its Content-Length: a Transfer-Encoding beside it wins (h11 then drops the
    length and streams it chunked)."""
    # raw_items: a plain list (iterating h11's Headers goes through the Sequence ABC, about twice as slow)
    names = {name.lower() for name, _ in response.headers.raw_items()}
    return _CONTENT_LENGTH in names and _TRANSFER_ENCODING not in names


async def _send_h11_event(self: Any, event: Any) -> None:
    try:
        data = self.connection.send(event)
    except h11.LocalProtocolError:
        if self.connection.their_state != h11.ERROR:
            raise
        return
    if type(event) is h11.Response and _sized(event):  # its body, or its end, comes next
        self._service_held_head = data
        return
    held = self._service_held_head
    if held:
        self._service_held_head = b""
        if len(data) > MAX_JOINED_BYTES:
            await self.send(RawData(data=held))
        else:
            data = held + data
    if data:
        await self.send(RawData(data=data))


async def _flush_held(self: Any) -> None:
    held = self._service_held_head
    if held:
        self._service_held_head = b""
        await self.send(RawData(data=held))


def install() -> None:
    """Make every Hypercorn HTTP/1 connection write this way (idempotent). Left alone, with a warning, where
    Hypercorn no longer has what it replaces (``pyproject.toml`` holds Hypercorn below 0.19)."""
    protocol = hypercorn_h11.H11Protocol
    if not should_patch(protocol, _INSTALLED, _PROTOCOL_ATTRIBUTES, "the services' single write"):
        return
    original_maybe_recycle = protocol._maybe_recycle

    async def maybe_recycle(self: Any) -> None:  # the stream closed: a head still held goes out first
        await _flush_held(self)
        await original_maybe_recycle(self)

    protocol._service_held_head = b""  # type: ignore[attr-defined]  # the head held by a connection, or none
    protocol._send_h11_event = _send_h11_event  # type: ignore[method-assign]
    protocol._maybe_recycle = maybe_recycle  # type: ignore[method-assign]
    setattr(protocol, _INSTALLED, True)

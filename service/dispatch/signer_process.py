"""Ed25519 signing in a child process, batched, so the event loop's core only parses, routes and answers.

A signature is the largest CPU cost of a ``/route/`` call, and on the loop it also evicts the caches the HTTP
work needs. A thread does not help (GIL hand-offs cost more than they free), a second process does: the
assignments queued while a batch is out are sent together as one pipe message, the child signs them back to back
and returns the signatures in one message. One write and one read per batch; no timer (a lone request goes at
once). The child starts with the service (``start``, from the lifespan); until then, and if it ever dies, signing
happens on the loop (``SignatureBatcher``), so the dispatcher keeps serving either way.

Wire format, both ways one ``Connection.send_bytes`` message: requests are ``u32 length + message`` repeated;
the answer is the 64-byte signatures concatenated in the same order.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import struct
from multiprocessing.connection import Connection

from nacl.bindings import crypto_sign, crypto_sign_seed_keypair

from service.dispatch.signing import SIGNATURE_BYTES, Assignment, Signer, canonical_bytes
from service.dispatch.signing_batch import SignatureBatcher

logger = logging.getLogger(__name__)

_LENGTH = struct.Struct("<I")
JOIN_TIMEOUT_S = 5.0

Pending = list[tuple[bytes, "asyncio.Future[str]"]]


def pack(messages: list[bytes]) -> bytes:
    return b"".join(_LENGTH.pack(len(m)) + m for m in messages)


def unpack(data: bytes) -> list[bytes]:
    messages, offset = [], 0
    while offset < len(data):
        (size,) = _LENGTH.unpack_from(data, offset)
        offset += _LENGTH.size
        messages.append(data[offset : offset + size])
        offset += size
    return messages


def _child(conn: Connection, seed: bytes) -> None:
    """The signing process: sign each batch it receives until the pipe closes."""
    _, secret = crypto_sign_seed_keypair(seed)
    try:
        while True:
            batch = unpack(conn.recv_bytes())
            conn.send_bytes(b"".join(crypto_sign(m, secret)[:SIGNATURE_BYTES] for m in batch))
    except (EOFError, OSError, KeyboardInterrupt):
        return


class SignerProcess:
    """``sign(assignment) -> hex signature``, done by a child process; ``start`` on the running loop first."""

    def __init__(self, signer: Signer) -> None:
        self.signer = signer
        self._fallback = SignatureBatcher(signer)
        self._conn: Connection | None = None
        self._process: multiprocessing.process.BaseProcess | None = None
        self._pending: Pending = []
        self._inflight: Pending = []
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def running(self) -> bool:
        return self._conn is not None

    def start(self) -> None:
        """Start the child and watch its pipe from the running loop."""
        ctx = multiprocessing.get_context("spawn")  # no copy of the server's state, threads or sockets
        conn, child_conn = ctx.Pipe(duplex=True)
        self._process = ctx.Process(target=_child, args=(child_conn, self.signer.seed), name="signer", daemon=True)
        self._process.start()
        child_conn.close()
        self._conn = conn
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(conn.fileno(), self._on_readable)

    async def sign(self, assignment: Assignment) -> str:
        if self._conn is None or self._loop is None:
            return await self._fallback.sign(assignment)
        future: asyncio.Future[str] = self._loop.create_future()
        self._pending.append((canonical_bytes(assignment), future))
        if not self._inflight and len(self._pending) == 1:
            self._loop.call_soon(self._send)
        return await future

    def close(self) -> None:
        """Stop the child (closing the pipe ends its loop); what is still queued is signed here."""
        self._stop_watching()
        if self._process is not None:
            self._process.join(JOIN_TIMEOUT_S)
            if self._process.is_alive():
                self._process.kill()
                self._process.join()
            self._process = None

    # -- internals ----------------------------------------------------------------------------------------------
    def _send(self) -> None:
        if self._conn is None or self._inflight or not self._pending:
            return
        self._inflight, self._pending = self._pending, []
        try:
            self._conn.send_bytes(pack([message for message, _ in self._inflight]))
        except OSError as exc:
            self._fail(exc)

    def _on_readable(self) -> None:
        assert self._conn is not None
        try:
            data = self._conn.recv_bytes()
        except (EOFError, OSError) as exc:
            self._fail(exc)
            return
        batch, self._inflight = self._inflight, []
        for index, (_, future) in enumerate(batch):
            if not future.done():
                start = index * SIGNATURE_BYTES
                future.set_result(data[start : start + SIGNATURE_BYTES].hex())
        self._send()

    def _fail(self, exc: BaseException) -> None:
        logger.error("signing process failed (%s); signing on the event loop from now on", exc)
        self._stop_watching()

    def _stop_watching(self) -> None:
        """Close the pipe and sign whatever it still held here: no caller is failed for it."""
        if self._conn is not None:
            if self._loop is not None and not self._loop.is_closed():
                self._loop.remove_reader(self._conn.fileno())
            self._conn.close()
            self._conn = None
        held, self._inflight, self._pending = [*self._inflight, *self._pending], [], []
        for message, future in held:
            if not future.done():
                future.set_result(self.signer.sign_bytes(message).hex())

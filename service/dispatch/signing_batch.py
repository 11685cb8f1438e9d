"""Signatures made in batches on the event loop.

Ed25519 signing is the largest CPU cost of a ``/route/`` call. Signed one at a time between the HTTP work of
other requests, each signature runs with cold caches (libsodium's base-point tables and SHA-512 evicted by the
parser and the framework) and costs about three times what it costs in a tight loop. So ``sign`` queues the
assignment and the loop signs everything queued in the same iteration back to back, one callback later: no
thread (a signing thread measured slower: GIL hand-offs cost more than they free) and no timer.
"""

from __future__ import annotations

import asyncio

from service.dispatch.signing import Assignment, Signer


class SignatureBatcher:
    def __init__(self, signer: Signer) -> None:
        self.signer = signer
        self._pending: list[tuple[Assignment, asyncio.Future[str]]] = []

    async def sign(self, assignment: Assignment) -> str:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[str] = loop.create_future()
        self._pending.append((assignment, future))
        if len(self._pending) == 1:
            loop.call_soon(self._flush)
        return await future

    def _flush(self) -> None:
        batch, self._pending = self._pending, []
        sign = self.signer.sign
        for assignment, future in batch:
            if future.done():  # the caller went away
                continue
            try:
                future.set_result(sign(assignment))
            except Exception as exc:  # that caller gets the error; the rest of the batch is unaffected
                future.set_exception(exc)

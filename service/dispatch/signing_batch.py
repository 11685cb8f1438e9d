"""Signatures made in batches on the event loop.

Ed25519 signing is the largest CPU cost of a ``/route/`` call. Signed one at a time between the HTTP work of
other requests, each signature runs with cold caches (libsodium's base-point tables and SHA-512 evicted by the
parser and the framework) and costs about three times what it costs in a tight loop. So ``sign`` queues the
assignment and the loop signs everything queued in the same iteration, one callback later: no thread (a signing
thread measured slower: GIL hand-offs cost more than they free) and no timer.

The assignments of one iteration share one signature over a Merkle tree of up to ``max_leaves`` of them
(``signing``: RFC 9162 proofs, a random nonce per leaf): one Ed25519 signature and a few SHA-256 hashes per batch
instead of one signature per assignment. ``max_leaves=1`` signs every assignment alone, for workers whose verifier
predates batch proofs (``--no-batch-signatures``).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from service.dispatch.signing import MAX_BATCH_LEAVES, Assignment, Signature, Signer, canonical_bytes

Pending = tuple[bytes, "asyncio.Future[Signature]"]


class SignatureBatcher:
    def __init__(
        self,
        signer: Signer,
        *,
        max_leaves: int = MAX_BATCH_LEAVES,
        observe: Callable[[float], None] | None = None,
    ) -> None:
        if not 1 <= max_leaves <= MAX_BATCH_LEAVES:
            raise ValueError(f"max_leaves must be 1 to {MAX_BATCH_LEAVES}")
        self.signer = signer
        self.max_leaves = max_leaves
        self._observe = observe  # each signature's batch size (a histogram's observe)
        self._pending: list[tuple[Assignment, asyncio.Future[Signature]]] = []

    async def sign(self, assignment: Assignment) -> Signature:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Signature] = loop.create_future()
        self._pending.append((assignment, future))
        if len(self._pending) == 1:
            loop.call_soon(self._flush)
        return await future

    def _flush(self) -> None:
        pending, self._pending = self._pending, []
        queued: list[Pending] = []
        try:
            for assignment, future in pending:
                if future.done():  # the caller went away
                    continue
                try:
                    queued.append((canonical_bytes(assignment), future))
                except Exception as exc:  # that caller gets the error; the rest are signed
                    future.set_exception(exc)
            for start in range(0, len(queued), self.max_leaves):
                self._sign(queued[start : start + self.max_leaves])
        finally:  # whatever escaped (a BaseException, a bug): no caller is left waiting for ever
            for _, future in pending:
                if not future.done():
                    future.set_exception(RuntimeError("the signature batch failed"))

    def _sign(self, batch: list[Pending]) -> None:
        try:
            if self._observe is not None:
                self._observe(len(batch))
            signatures = self.signer.sign_batch([message for message, _ in batch])
        except Exception as exc:  # handed to the callers, who answer it: the loop callback must not lose it
            for _, future in batch:
                future.set_exception(exc)
            return
        for (_, future), signature in zip(batch, signatures, strict=True):
            future.set_result(signature)

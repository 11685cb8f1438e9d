"""Signatures made in batches on the event loop.

Ed25519 signing is the largest CPU cost of a ``/route/`` call. Signed one at a time between the HTTP work of
other requests, each signature runs with cold caches (libsodium's base-point tables and SHA-512 evicted by the
parser and the framework) and costs about three times what it costs in a tight loop. So ``sign`` queues the
assignment and the loop signs everything queued in the same iteration, one callback later: no thread (a signing
thread measured slower: GIL hand-offs cost more than they free) and no timer.

With ``batch`` (the default), each endpoint's assignments of one iteration share one signature over a Merkle tree
of them (``signing``: RFC 9162 proofs): one Ed25519 signature and a few SHA-256 hashes per batch instead of one
signature per assignment. Batches stay within one endpoint, so the sibling hashes in a proof only ever come from
assignments to that endpoint's own workers. Without it, every assignment is signed alone, for workers whose
verifier predates batch proofs.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from service.dispatch.signing import MAX_BATCH_LEAVES, Assignment, Signature, Signer, canonical_bytes


class SignatureBatcher:
    def __init__(
        self,
        signer: Signer,
        *,
        batch: bool = True,
        max_leaves: int = MAX_BATCH_LEAVES,
        observe: Callable[[float], None] | None = None,
    ) -> None:
        self.signer = signer
        self.batch = batch
        self.max_leaves = max_leaves if batch else 1
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
        by_endpoint: dict[str, list[tuple[bytes, asyncio.Future[Signature]]]] = {}
        for assignment, future in pending:
            if future.done():  # the caller went away
                continue
            try:
                message = canonical_bytes(assignment)
            except ValueError as exc:  # that caller gets the error; the rest of the batch is unaffected
                future.set_exception(exc)
                continue
            by_endpoint.setdefault(assignment.endpoint, []).append((message, future))
        for queued in by_endpoint.values():
            for start in range(0, len(queued), self.max_leaves):
                self._sign(queued[start : start + self.max_leaves])

    def _sign(self, batch: list[tuple[bytes, asyncio.Future[Signature]]]) -> None:
        if self._observe is not None:
            self._observe(len(batch))
        try:
            signatures = self.signer.sign_batch([message for message, _ in batch])
        except Exception as exc:  # handed to the callers, who answer it: the loop callback must not lose it
            for _, future in batch:
                future.set_exception(exc)
            return
        for (_, future), signature in zip(batch, signatures, strict=True):
            future.set_result(signature)

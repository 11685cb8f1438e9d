"""Ed25519 signing off the event loop, in batches, on a thread of its own.

Signing is the largest CPU cost of a ``/route/`` call (~25 us of libsodium per signature) and libsodium
runs without the GIL, so a second core can sign while the event loop parses and answers the next requests.
Requests that arrive while a batch is being signed form the next batch: one thread wake-up per batch, not per
signature, and no timer (an idle dispatcher signs a lone request at once).
"""

from __future__ import annotations

import asyncio
import concurrent.futures

from service.dispatch.signing import Assignment, Signer


class SigningThread:
    def __init__(self, signer: Signer) -> None:
        self.signer = signer
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="signer")
        self._pending: list[tuple[Assignment, asyncio.Future[str]]] = []
        self._busy = False
        self._closed = False

    async def sign(self, assignment: Assignment) -> str:
        if self._closed:
            raise RuntimeError("the signing thread is closed")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[str] = loop.create_future()
        self._pending.append((assignment, future))
        if not self._busy:
            self._start_batch(loop)
        return await future

    def close(self) -> None:
        self._closed = True
        self._executor.shutdown(wait=True, cancel_futures=True)

    def _start_batch(self, loop: asyncio.AbstractEventLoop) -> None:
        batch, self._pending = self._pending, []
        self._busy = True
        self._executor.submit(self._sign_batch, loop, batch)

    def _sign_batch(self, loop: asyncio.AbstractEventLoop, batch: list[tuple[Assignment, asyncio.Future[str]]]) -> None:
        results = [self._sign_one(assignment) for assignment, _ in batch]
        loop.call_soon_threadsafe(self._finish_batch, loop, batch, results)

    def _sign_one(self, assignment: Assignment) -> str | BaseException:
        try:
            return self.signer.sign(assignment)
        except Exception as exc:  # handed to that one waiter on the loop; the rest of the batch is unaffected
            return exc

    def _finish_batch(
        self,
        loop: asyncio.AbstractEventLoop,
        batch: list[tuple[Assignment, asyncio.Future[str]]],
        results: list[str | BaseException],
    ) -> None:
        for (_, future), result in zip(batch, results, strict=True):
            if future.done():  # the caller was cancelled
                continue
            if isinstance(result, BaseException):
                future.set_exception(result)
            else:
                future.set_result(result)
        self._busy = False
        if self._pending:
            self._start_batch(loop)

"""The loop-side signature batcher: every caller gets its own signature, one failure stays with its caller."""

from __future__ import annotations

import asyncio

import pytest

from service.dispatch.signing import Assignment, Signer
from service.dispatch.signing_batch import SignatureBatcher


def assignment(reqnum: int, url: str = "http://w:1") -> Assignment:
    return Assignment(endpoint="ep", url=url, cost=1.5, reqnum=reqnum, request_idx=reqnum, expires_at_ms=1, key_id="k")


async def test_concurrent_callers_are_signed_in_one_batch_each_with_its_own_signature() -> None:
    signer = Signer.generate()
    batcher = SignatureBatcher(signer)
    flushes = 0
    original = batcher._flush

    def counting_flush() -> None:
        nonlocal flushes
        flushes += 1
        original()

    batcher._flush = counting_flush  # type: ignore[method-assign]
    items = [assignment(n) for n in range(1, 21)]
    signatures = await asyncio.gather(*(batcher.sign(a) for a in items))
    assert flushes == 1  # queued in the same loop iteration: signed back to back
    for a, signature in zip(items, signatures, strict=True):
        assert signature == signer.sign(a)  # Ed25519 is deterministic: each caller got its own assignment's
    assert len(set(signatures)) == len(items)


async def test_a_failing_signature_fails_only_its_caller() -> None:
    batcher = SignatureBatcher(Signer.generate())
    good, bad = assignment(1), assignment(2, url='http://bad"url')  # refused by the canonical encoding
    results = await asyncio.gather(batcher.sign(good), batcher.sign(bad), return_exceptions=True)
    assert isinstance(results[0], str) and len(results[0]) == 128
    assert isinstance(results[1], ValueError)


async def test_a_cancelled_caller_is_skipped() -> None:
    signer = Signer.generate()
    batcher = SignatureBatcher(signer)
    first = asyncio.ensure_future(batcher.sign(assignment(1)))
    second = asyncio.ensure_future(batcher.sign(assignment(2)))
    await asyncio.sleep(0)  # both queued
    first.cancel()
    assert await second == signer.sign(assignment(2))
    with pytest.raises(asyncio.CancelledError):
        await first

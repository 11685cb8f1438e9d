"""The loop-side signature batcher: the assignments queued in one loop iteration share one signature (each with its
own proof), or are signed one by one without batching; one failure stays with its caller."""

from __future__ import annotations

import asyncio
import dataclasses
from collections import Counter

import pytest

from service.dispatch.signing import Assignment, KeyRing, Signature, Signer
from service.dispatch.signing_batch import SignatureBatcher

SEED = b"\x07" * 32  # every test's signer holds this key: the assignments name its key id
KEY_ID = Signer.generate(SEED).key_id


def assignment(reqnum: int, url: str = "http://w:1", endpoint: str = "ep") -> Assignment:
    return Assignment(
        endpoint=endpoint, url=url, cost=1.5, reqnum=reqnum, request_idx=reqnum, expires_at_ms=1, key_id=KEY_ID
    )


def counting_flushes(batcher: SignatureBatcher) -> list[int]:
    flushes: list[int] = []
    original = batcher._flush

    def counting_flush() -> None:
        flushes.append(len(batcher._pending))
        original()

    batcher._flush = counting_flush  # type: ignore[method-assign]
    return flushes


def verifies(signer: Signer, a: Assignment, signature: Signature) -> bool:
    return KeyRing([signer.public_key]).verify(a, signature.hex, signature.batch)


async def test_concurrent_callers_share_one_signature_each_with_its_own_proof() -> None:
    signer = Signer.generate(SEED)
    batcher = SignatureBatcher(signer)
    flushes = counting_flushes(batcher)
    items = [assignment(n) for n in range(1, 21)]
    signatures = await asyncio.gather(*(batcher.sign(a) for a in items))
    assert flushes == [20]  # queued in the same loop iteration: one flush
    assert len({s.hex for s in signatures}) == 1
    for i, (a, signature) in enumerate(zip(items, signatures, strict=True)):
        assert signature.batch is not None and (signature.batch.leaf_index, signature.batch.tree_size) == (i, 20)
        assert verifies(signer, a, signature)
    assert not verifies(signer, items[0], signatures[1])  # each proof is its own assignment's


async def test_without_batching_each_caller_gets_its_own_lone_signature() -> None:
    signer = Signer.generate(SEED)
    batcher = SignatureBatcher(signer, max_leaves=1)
    flushes = counting_flushes(batcher)
    items = [assignment(n) for n in range(1, 6)]
    signatures = await asyncio.gather(*(batcher.sign(a) for a in items))
    assert flushes == [5]  # still signed back to back in one callback
    for a, signature in zip(items, signatures, strict=True):
        assert signature.batch is None
        assert signature.hex == signer.sign(a)  # Ed25519 is deterministic: each caller got its own assignment's


async def test_a_lone_caller_gets_a_lone_signature() -> None:
    signer = Signer.generate(SEED)
    signature = await SignatureBatcher(signer).sign(assignment(7))
    assert signature == Signature(signer.sign(assignment(7)), None)


async def test_several_endpoints_share_one_tree() -> None:
    """Each leaf's secret nonce keeps the sibling hashes in a proof meaningless to whoever holds it, whatever endpoint
    the neighbours were routed for."""
    signer = Signer.generate(SEED)
    batcher = SignatureBatcher(signer)
    items = [assignment(n, endpoint="a" if n % 3 else "b") for n in range(1, 13)]
    signatures = await asyncio.gather(*(batcher.sign(a) for a in items))
    assert len({s.hex for s in signatures}) == 1
    assert all(s.batch is not None and s.batch.tree_size == 12 for s in signatures)
    assert all(verifies(signer, a, s) for a, s in zip(items, signatures, strict=True))


async def test_a_batch_queued_before_a_key_rotation_is_signed_by_the_key_it_names() -> None:
    """SIGHUP swaps in a new batcher; the old one's pending flush still runs, with the old signer."""
    old, new = Signer.generate(SEED), Signer.generate()
    old_batcher, new_batcher = SignatureBatcher(old), SignatureBatcher(new)
    before = [asyncio.ensure_future(old_batcher.sign(assignment(n))) for n in (1, 2)]
    after = dataclasses.replace(assignment(3), key_id=new.key_id)
    signed_after = await new_batcher.sign(after)
    for n, signature in zip((1, 2), await asyncio.gather(*before), strict=True):
        assert verifies(old, assignment(n), signature)
    assert verifies(new, after, signed_after)


async def test_a_large_batch_is_split_into_trees_of_at_most_max_leaves() -> None:
    signer = Signer.generate(SEED)
    observed: list[float] = []
    batcher = SignatureBatcher(signer, max_leaves=4, observe=observed.append)
    items = [assignment(n) for n in range(1, 11)]
    signatures = await asyncio.gather(*(batcher.sign(a) for a in items))
    sizes = Counter(s.batch.tree_size if s.batch else 1 for s in signatures)
    assert sizes == {4: 8, 2: 2}
    assert observed == [4, 4, 2]  # the metric: assignments per signature
    assert len({s.hex for s in signatures}) == 3
    assert all(verifies(signer, a, s) for a, s in zip(items, signatures, strict=True))


async def test_a_failing_encoding_fails_only_its_caller() -> None:
    signer = Signer.generate(SEED)
    batcher = SignatureBatcher(signer)
    good, bad, other = assignment(1), assignment(2, url='http://bad"url'), assignment(3)  # bad: no canonical bytes
    results = await asyncio.gather(*(batcher.sign(a) for a in (good, bad, other)), return_exceptions=True)
    assert isinstance(results[1], ValueError)
    first, third = results[0], results[2]
    assert isinstance(first, Signature) and isinstance(third, Signature)
    assert first.batch is not None and first.batch.tree_size == 2  # the rest still share one signature
    assert verifies(signer, good, first) and verifies(signer, other, third)


async def test_any_error_encoding_one_assignment_fails_only_its_caller() -> None:
    """Not only the encoding's ValueError: a callback that raised left every other caller of its flush waiting."""
    signer = Signer.generate(SEED)
    batcher = SignatureBatcher(signer)
    broken = dataclasses.replace(assignment(2), endpoint=None)  # type: ignore[arg-type]
    results = await asyncio.gather(*(batcher.sign(a) for a in (assignment(1), broken)), return_exceptions=True)
    assert isinstance(results[1], TypeError)
    assert isinstance(results[0], Signature) and verifies(signer, assignment(1), results[0])


async def test_a_failing_signer_fails_its_batch_and_the_next_batch_is_signed() -> None:
    signer = Signer.generate(SEED)
    batcher = SignatureBatcher(signer)
    original = signer.sign_bytes
    signer.sign_bytes = lambda message: (_ for _ in ()).throw(RuntimeError("libsodium failed"))  # type: ignore[method-assign]
    results = await asyncio.gather(batcher.sign(assignment(1)), batcher.sign(assignment(2)), return_exceptions=True)
    assert [type(r) for r in results] == [RuntimeError, RuntimeError]
    signer.sign_bytes = original  # type: ignore[method-assign]
    assert verifies(signer, assignment(3), await batcher.sign(assignment(3)))


async def test_a_cancelled_caller_is_skipped() -> None:
    signer = Signer.generate(SEED)
    batcher = SignatureBatcher(signer)
    first = asyncio.ensure_future(batcher.sign(assignment(1)))
    second = asyncio.ensure_future(batcher.sign(assignment(2)))
    await asyncio.sleep(0)  # both queued
    first.cancel()
    assert await second == Signature(signer.sign(assignment(2)), None)  # alone in its batch now
    with pytest.raises(asyncio.CancelledError):
        await first


class Escape(BaseException):
    """What ``except Exception`` does not catch (as KeyboardInterrupt)."""


async def test_nothing_that_escapes_a_flush_leaves_a_caller_waiting() -> None:
    signer = Signer.generate(SEED)
    batcher = SignatureBatcher(signer)
    loop = asyncio.get_running_loop()
    futures: list[asyncio.Future[Signature]] = [loop.create_future() for _ in range(3)]
    batcher._pending = [(assignment(n), future) for n, future in enumerate(futures, start=1)]

    def escaping(messages: object) -> list[Signature]:
        raise Escape

    signer.sign_batch = escaping  # type: ignore[assignment]
    with pytest.raises(Escape):  # called as the loop would: it stops the loop, as it should
        batcher._flush()
    assert all(isinstance(future.exception(), RuntimeError) for future in futures)


@pytest.mark.parametrize("max_leaves", [0, -1, 257])
def test_max_leaves_is_bounded(max_leaves: int) -> None:
    with pytest.raises(ValueError, match="max_leaves"):
        SignatureBatcher(Signer.generate(SEED), max_leaves=max_leaves)

"""The signing child process: correct signatures in order, batches, and no caller lost when it dies."""

from __future__ import annotations

import asyncio

from service.dispatch.signer_process import SignerProcess, pack, unpack
from service.dispatch.signing import Assignment, Signer


def assignment(reqnum: int) -> Assignment:
    return Assignment(endpoint="ep", url="http://w:1", cost=2.5, reqnum=reqnum, request_idx=reqnum, expires_at_ms=1,
                      key_id="k")  # fmt: skip


def test_pack_round_trip() -> None:
    messages = [b"", b"a", b"x" * 300, bytes(range(256))]
    assert unpack(pack(messages)) == messages


async def test_signs_in_the_child_in_order_and_matches_the_loop() -> None:
    signer = Signer.generate()
    process = SignerProcess(signer)
    process.start()
    try:
        assert process.running
        items = [assignment(n) for n in range(1, 41)]
        signatures = await asyncio.gather(*(process.sign(a) for a in items))
        assert signatures == [signer.sign(a) for a in items]  # Ed25519 is deterministic: same bytes, same order
        assert await process.sign(assignment(99)) == signer.sign(assignment(99))  # a lone call after a batch
    finally:
        process.close()
    assert not process.running


async def test_before_start_and_after_close_it_signs_on_the_loop() -> None:
    signer = Signer.generate()
    process = SignerProcess(signer)
    assert await process.sign(assignment(1)) == signer.sign(assignment(1))
    process.start()
    process.close()
    assert await process.sign(assignment(2)) == signer.sign(assignment(2))


async def test_a_dead_child_loses_no_caller() -> None:
    signer = Signer.generate()
    process = SignerProcess(signer)
    process.start()
    try:
        assert process._process is not None
        process._process.kill()
        process._process.join()
        results = await asyncio.wait_for(asyncio.gather(*(process.sign(assignment(n)) for n in range(1, 6))), 10)
        assert results == [signer.sign(assignment(n)) for n in range(1, 6)]
        assert not process.running  # it noticed, and signs on the loop from now on
        assert await process.sign(assignment(7)) == signer.sign(assignment(7))
    finally:
        process.close()

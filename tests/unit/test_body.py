"""Reading a request body within limits: content type (415), size (413), time (408), and a departed client."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from starlette.requests import ClientDisconnect

from service.errors import InvalidRequest, Overloaded, PayloadTooLarge, RequestTimeout, UnsupportedMediaType
from service.http import body as body_module
from service.http.body import BodyReader

JSON = {b"content-type": b"application/json"}


def chunks(*parts: bytes) -> Any:
    messages = [{"type": "http.request", "body": p, "more_body": i < len(parts) - 1} for i, p in enumerate(parts)]

    async def receive() -> dict[str, Any]:
        return messages.pop(0)

    return receive


def stalling(gate: asyncio.Event, size: int) -> Any:
    """``size`` bytes, then the rest (nothing) once ``gate`` opens."""
    messages = [{"type": "http.request", "body": b"x" * size, "more_body": True}]

    async def receive() -> dict[str, Any]:
        if messages:
            return messages.pop()
        await gate.wait()
        return {"type": "http.request", "body": b"", "more_body": False}

    return receive


async def never() -> dict[str, Any]:
    await asyncio.Event().wait()
    raise AssertionError("unreachable")


async def test_a_body_in_one_or_several_messages() -> None:
    reader = BodyReader(max_bytes=100, timeout_s=5)
    assert await reader.read(JSON, chunks(b'{"a": 1}')) == b'{"a": 1}'
    assert await reader.read(JSON, chunks(b'{"a"', b": ", b"1}")) == b'{"a": 1}'
    assert await reader.read({b"content-type": b"application/problem+json"}, chunks(b"{}")) == b"{}"
    assert await reader.read({}, chunks(b"{}")) == b"{}"  # no content type: taken as JSON
    assert reader._deadlines == {}  # nothing left registered


async def test_refusals_close_the_connection() -> None:
    reader = BodyReader(max_bytes=10, timeout_s=5)
    with pytest.raises(UnsupportedMediaType) as media:
        await reader.read({b"content-type": b"text/plain"}, chunks(b"{}"))
    with pytest.raises(PayloadTooLarge) as declared:
        await reader.read({**JSON, b"content-length": b"11"}, chunks(b"{}"))
    with pytest.raises(PayloadTooLarge) as streamed:
        await reader.read(JSON, chunks(b"123456", b"78901"))
    assert media.value.close_connection and declared.value.close_connection and streamed.value.close_connection
    with pytest.raises(ClientDisconnect):
        await reader.read(JSON, lambda: asyncio.sleep(0, {"type": "http.disconnect"}))


async def test_a_body_in_too_many_pieces_is_refused_before_it_is_all_read() -> None:
    """One byte per chunk: ~17 µs of parsing each, 16 s of CPU for a 1 MiB body in one unauthenticated request."""
    reader = BodyReader(max_bytes=64 * 1024, timeout_s=5)
    assert reader.max_pieces == 256
    whole = b"[" + b"1," * 127 + b"1]"
    assert await reader.read(JSON, chunks(*(whole[i : i + 1] for i in range(255)), whole[255:])) == whole  # 256 pieces
    received = 0

    async def one_byte_at_a_time() -> dict[str, Any]:
        nonlocal received
        received += 1
        return {"type": "http.request", "body": b" ", "more_body": True}

    with pytest.raises(InvalidRequest, match="body sent in over 256 pieces") as refused:
        await reader.read(JSON, one_byte_at_a_time)
    assert refused.value.close_connection and refused.value.status == 400
    assert received == 257  # read no further than the piece past the limit
    assert BodyReader(max_bytes=1000, timeout_s=5).max_pieces == body_module.MIN_BODY_PIECES  # small limits: a floor


async def test_a_stalled_body_is_a_408_once_its_time_is_up(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(body_module, "SWEEP_S", 0.02)
    reader = BodyReader(max_bytes=100, timeout_s=0.1)
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(RequestTimeout) as info:
        await reader.read(JSON, never)
    assert 0.1 <= loop.time() - started < 5.0  # a bound against hanging, not a speed claim
    assert info.value.status == 408 and info.value.close_connection
    assert reader._deadlines == {} and reader._expired == set()
    # the task is usable afterwards: the timeout's cancellation was taken back
    assert asyncio.current_task().cancelling() == 0  # type: ignore[union-attr]
    # a read that is in time is left alone while another one expires
    slow = asyncio.ensure_future(reader.read(JSON, never))
    quick = await reader.read(JSON, chunks(b"{}"))
    assert quick == b"{}"
    with pytest.raises(RequestTimeout):
        await slow


async def test_a_cancellation_that_is_not_the_timeout_goes_through() -> None:
    reader = BodyReader(max_bytes=100, timeout_s=60)
    task = asyncio.ensure_future(reader.read(JSON, never))
    await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert reader._deadlines == {}


async def test_bodies_being_read_share_one_memory_budget() -> None:
    """Stalled bodies were held until their timeout without limit across connections: a thousand unauthenticated
    1 MiB bodies pinned 1.4 GB of the dispatcher's memory."""
    reader = BodyReader(max_bytes=100, timeout_s=5, max_buffered_bytes=250)
    assert BodyReader(max_bytes=100, timeout_s=5).max_buffered_bytes == 6400  # 64 bodies by default
    gate = asyncio.Event()
    stalled = [asyncio.create_task(reader.read(JSON, stalling(gate, 80))) for _ in range(2)]
    await asyncio.sleep(0.01)
    assert reader._buffered == 160
    with pytest.raises(Overloaded) as refused:  # 160 + 100 > 250
        await reader.read(JSON, chunks(b"y" * 100))
    assert refused.value.close_connection and refused.value.status == 429 and reader._buffered == 160
    assert await reader.read(JSON, chunks(b"z" * 90)) == b"z" * 90  # 250: within the budget
    gate.set()
    assert [len(body) for body in await asyncio.gather(*stalled)] == [80, 80]
    assert reader._buffered == 0  # given back as each read ends


async def test_untrusted_bodies_hold_only_their_share_of_the_budget() -> None:
    """About 64 stalled bodies without any credential filled the one budget, and every keyed /route/ got 429 until
    they timed out: untrusted reads now stop at their share, and trusted ones keep the rest."""
    reader = BodyReader(max_bytes=100, timeout_s=5, max_buffered_bytes=400, max_untrusted_bytes=200)
    gate = asyncio.Event()
    stalled = [asyncio.create_task(reader.read(JSON, stalling(gate, 90), trusted=False)) for _ in range(2)]
    await asyncio.sleep(0.01)
    assert reader._buffered == reader._untrusted == 180
    with pytest.raises(Overloaded) as refused:  # 180 + 30 > 200 untrusted, though 210 is within the whole budget
        await reader.read(JSON, chunks(b"u" * 30), trusted=False)
    assert refused.value.close_connection and refused.value.status == 429
    assert "Authorization: Bearer" in refused.value.message  # where a key-in-the-body client may move its key
    assert await reader.read(JSON, chunks(b"t" * 100)) == b"t" * 100  # trusted: 280 of the whole 400
    trusted = [asyncio.create_task(reader.read(JSON, stalling(gate, 100))) for _ in range(2)]
    await asyncio.sleep(0.01)
    assert (reader._buffered, reader._untrusted) == (380, 180)
    with pytest.raises(Overloaded):  # untrusted bytes count against the whole budget too: 380 + 30 > 400
        await reader.read(JSON, chunks(b"t" * 30))
    gate.set()
    await asyncio.gather(*stalled, *trusted)
    assert reader._buffered == reader._untrusted == 0  # given back as each read ends
    assert await reader.read(JSON, chunks(b"u" * 100), trusted=False) == b"u" * 100


def test_the_untrusted_share_defaults_to_a_quarter_of_the_budget() -> None:
    assert BodyReader(max_bytes=100, timeout_s=5).max_untrusted_bytes == 1600  # of 6400
    assert BodyReader(max_bytes=100, timeout_s=5, max_buffered_bytes=200).max_untrusted_bytes == 100  # one body
    assert (
        BodyReader(max_bytes=100, timeout_s=5, max_buffered_bytes=200, max_untrusted_bytes=999).max_untrusted_bytes
        == 200
    )

"""The load generator end to end, against local servers for about a second each: request counting, status and
exception accounting, warm-up exclusion, open-loop scheduling, HTTP framing, and merging across processes."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import subprocess
import sys
from collections import Counter
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from types import SimpleNamespace

import pytest

from benchmarks.common import REPO_ROOT, ServerProcess, find_free_port, running_server
from benchmarks.loadgen import runner
from benchmarks.loadgen.aio import AiohttpClient
from benchmarks.loadgen.http1 import Http1Client
from benchmarks.loadgen.runner import Plan, run_plan
from benchmarks.loadgen.stats import summarize
from benchmarks.loadgen.timing import Answer, now

OK, FAIL, BOOM = b'{"prompt": "ok"}', b'{"prompt": "fail"}', b'{"prompt": "boom"}'
_LENGTH = re.compile(rb"content-length: *(\d+)", re.IGNORECASE)


class EchoServer:
    """A tiny HTTP/1.1 server: 429 for a "fail" body, a dropped connection for "boom", else 200. ``chunked``
    answers with chunked encoding; ``close_every`` sends ``Connection: close`` on every n-th answer."""

    def __init__(self, chunked: bool = False, close_every: int = 0) -> None:
        self.chunked, self.close_every = chunked, close_every
        self.seen: Counter[bytes] = Counter()
        self.answers = 0

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                match = _LENGTH.search(head)
                assert match is not None
                body = await reader.readexactly(int(match.group(1)))
                self.seen[body] += 1
                if body == BOOM:
                    return
                self.answers += 1
                close = bool(self.close_every) and self.answers % self.close_every == 0
                writer.write(self._answer(429 if body == FAIL else 200, close))
                if close:
                    return
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    def _answer(self, status: int, close: bool) -> bytes:
        payload = b'{"ok": true}'
        head = f"HTTP/1.1 {status} X\r\nContent-Type: application/json\r\n"
        head += "Connection: close\r\n" if close else ""
        if self.chunked:
            return (head + "Transfer-Encoding: chunked\r\n\r\n").encode() + b"%x\r\n%s\r\n0\r\n\r\n" % (
                len(payload),
                payload,
            )
        return (head + f"Content-Length: {len(payload)}\r\n\r\n").encode() + payload


@contextlib.asynccontextmanager
async def _serve(server: EchoServer) -> AsyncIterator[str]:
    srv = await asyncio.start_server(server.handle, "127.0.0.1", 0)
    port = srv.sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}/echo"
    finally:
        srv.close()
        await srv.wait_closed()


ClientType = Callable[[str, list[bytes], int], Http1Client | AiohttpClient]


@pytest.mark.parametrize("client_type", [Http1Client, AiohttpClient])
async def test_closed_loop_counts_statuses_and_excludes_the_warmup(client_type: ClientType) -> None:
    server = EchoServer()
    bodies = [OK, OK, OK, FAIL]
    async with _serve(server) as url:
        client = client_type(url, bodies, 4)
        try:
            result = await run_plan(client, len(bodies), Plan("closed", 0.2, 1.0, 2.0, concurrency=4))
        finally:
            await client.aclose()
    answered = result.status[200] + result.status[429]
    assert answered == result.answered > 50
    # Percentiles are of 2xx answers only; the 429s keep their own histogram.
    assert result.latency.count == result.status[200] and result.failed_latency.count == result.status[429]
    assert 0 < result.ok_in_window <= result.answered_in_window
    assert not result.errors and result.unfinished == 0
    assert 0.2 <= result.status[429] / answered <= 0.3  # one body in four
    assert sum(server.seen.values()) > answered  # the warm-up's requests were sent but not recorded
    # Both ends of the window were marked. Not timed: a loop busy at the start (a first connection's imports, a
    # loaded machine) marks it late, and the client's CPU is then taken over the same shorter span.
    assert 0 < result.window_s <= 1.0 + 2.0 and result.cpu_s > 0
    assert result.body_wraps > 0  # four bodies, used over and over


async def test_open_loop_sends_on_schedule_and_counts_dropped_connections() -> None:
    server = EchoServer()
    bodies = [OK] * 9 + [BOOM]
    async with _serve(server) as url:
        client = Http1Client(url, bodies, 32)
        try:
            result = await run_plan(client, len(bodies), Plan("open", 0.2, 1.0, 2.0, rate=300.0, seed=1))
        finally:
            await client.aclose()
    assert abs(result.scheduled - 300) < 4 * 300**0.5
    errors = sum(result.errors.values())
    assert result.answered + errors == result.scheduled  # every scheduled request is accounted for
    assert errors == pytest.approx(result.scheduled / 10, abs=5)  # the "boom" bodies
    assert set(result.errors) <= {"ConnectionClosed", "ConnectionResetError"}
    assert result.status[200] == result.answered


async def test_chunked_answers_and_connection_close_are_handled() -> None:
    server = EchoServer(chunked=True, close_every=5)
    async with _serve(server) as url:
        client = Http1Client(url, [OK], 2)
        try:
            result = await run_plan(client, 1, Plan("closed", 0.0, 0.5, 2.0, concurrency=2))
        finally:
            await client.aclose()
    assert result.answered > 20 and not result.errors
    assert result.status == Counter({200: result.answered})
    assert client.connections_opened >= result.answered // 5


def test_processes_merge_against_the_bare_echo(tmp_path: Path) -> None:
    port = find_free_port()
    cmd = [sys.executable, str(REPO_ROOT / "benchmarks" / "baselines" / "bare_echo.py"), "--port", str(port)]
    bodies = tmp_path / "bodies.jsonl"
    bodies.write_text("".join(json.dumps({"prompt": f"p{i}"}) + "\n" for i in range(100)))
    out = tmp_path / "out.json"
    server = ServerProcess(cmd=cmd, base_url=f"http://127.0.0.1:{port}", log_path=tmp_path / "bare.log")
    with running_server(server, health_timeout_s=60):
        load = [sys.executable, "-m", "benchmarks.loadgen", "--url", f"{server.base_url}/echo", "--bodies",
                str(bodies), "--concurrency", "4", "--processes", "2", "--duration", "1", "--warmup", "0.3",
                "--out", str(out)]  # fmt: skip
        subprocess.run(load, cwd=REPO_ROOT, check=True, timeout=60)
    data = json.loads(out.read_text())
    result, parts = data["result"], data["per_process"]
    assert len(parts) == 2 and all(p["status"]["200"] > 0 for p in parts)
    assert result["status"] == {"200": sum(p["status"]["200"] for p in parts)}
    assert result["requests"] == result["ok"] == result["status"]["200"] > 20
    assert result["failed"] == 0 and result["errors"] == {}
    assert result["latency_ms"]["p50"] > 0 and result["latency_ms"]["p99"] >= result["latency_ms"]["p50"]
    assert data["config"]["processes"] == 2 and data["config"]["bodies"] == 100


class GatedClient:
    """No network: every request waits for ``gate`` and then for its turn on ``slots`` connections, held
    ``hold_s`` each; ``sent_at`` is taken once it has a slot, as the real clients do."""

    def __init__(self, slots: int = 1000, hold_s: float = 0.0) -> None:
        self.gate = asyncio.Event()
        self.gate.set()
        self._slots = asyncio.Semaphore(slots)
        self.hold_s = hold_s
        self.connections_opened = 0

    async def send(self, index: int) -> Answer:
        await self.gate.wait()
        async with self._slots:
            sent_at = now()
            await asyncio.sleep(self.hold_s)
            return Answer(200, 2, sent_at)

    async def aclose(self) -> None:
        pass


async def test_answers_that_arrive_in_the_drain_do_not_count_as_throughput() -> None:
    client = GatedClient()
    client.gate.clear()
    plan = Plan("open", 0.1, 0.5, 5.0, rate=200.0, seed=3)
    # Nothing is answered before the window has ended: a server that served nothing inside it.
    asyncio.get_running_loop().call_later(plan.warmup_s + plan.duration_s + 0.3, client.gate.set)
    result = await run_plan(client, 1, plan)
    summary = summarize(result, plan.duration_s)
    assert summary["ok"] == result.scheduled > 0 and summary["unfinished"] == 0
    assert summary["ok_in_window"] == summary["answered_in_window"] == 0
    assert summary["ok_rps"] == 0.0


async def test_open_loop_send_lag_is_the_generators_own_and_the_pool_wait_counts_in_the_latency() -> None:
    hold_s = 0.02
    client = GatedClient(slots=1, hold_s=hold_s)  # one connection, 50 req/s at most: a queue in the client
    result = await run_plan(client, 1, Plan("open", 0.0, 0.5, 5.0, rate=200.0, seed=4))
    assert result.send_lag.count == result.pool_wait.count == result.answered > 0
    lag, wait = result.send_lag.summary_ms(), result.pool_wait.summary_ms()
    assert wait["max"] > hold_s * 1e3  # requests queued behind others for whole service times
    assert lag["p50"] < hold_s * 1e3  # the generator itself kept its schedule: that queue is not its lag
    assert result.latency.summary_ms()["max"] >= wait["max"] + hold_s * 1e3


async def test_a_request_started_before_its_schedule_counts_its_latency_from_its_start(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """uvloop's timers round to the millisecond, so some sleeps end early; from the schedule, those requests'
    latency was under-reported by up to that much."""
    early_s, hold_s = 0.006, 0.02

    async def early_sleep(delay: float, result: object = None) -> object:
        return await asyncio.sleep(max(0.0, delay - early_s), result)

    # the runner's timers only (the client's hold keeps the real sleep)
    monkeypatch.setattr(runner, "asyncio", SimpleNamespace(**{**vars(asyncio), "sleep": early_sleep}))
    result = await run_plan(GatedClient(hold_s=hold_s), 1, Plan("open", 0.0, 0.5, 5.0, rate=100.0, seed=5))
    assert result.answered > 10
    # from the schedule: about 14 ms (hold_s - early_s); from the start: the hold, less the timer's own ~1 ms
    assert result.latency.summary_ms()["p50"] >= (hold_s - early_s / 3) * 1e3, result.latency.summary_ms()


async def test_the_pool_stamps_a_request_when_it_gets_a_connection() -> None:
    gate, handled = asyncio.Event(), asyncio.Event()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                match = _LENGTH.search(head)
                assert match is not None
                await reader.readexactly(int(match.group(1)))
                await gate.wait()
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}")
        writer.close()
        await writer.wait_closed()
        handled.set()

    srv = await asyncio.start_server(handle, "127.0.0.1", 0)
    client = Http1Client(f"http://127.0.0.1:{srv.sockets[0].getsockname()[1]}/x", [OK], 1)
    try:
        first = asyncio.create_task(client.send(0))
        second = asyncio.create_task(client.send(0))
        await asyncio.sleep(0.05)  # the first waits on the server, the second on the pool's only connection
        released = now()
        gate.set()
        a, b = await first, await second
    finally:
        await client.aclose()
        await handled.wait()  # the one connection's handler saw the close: nothing is left for the GC to warn about
        srv.close()
        await srv.wait_closed()
    assert a.status == b.status == 200
    assert a.sent_at < released <= b.sent_at

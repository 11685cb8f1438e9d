"""The dispatch client against a fake dispatcher and fake workers (httpx.MockTransport): retries under the same
request_idx, back-off, giving up, what is never retried; and once end to end with the example worker."""

from __future__ import annotations

import asyncio
import dataclasses
import random
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from typing import Any

import httpx
import orjson
import pytest
from starlette.applications import Starlette

from service.dispatch import example_worker as example_worker_module
from service.dispatch.client import (
    RETRY_AFTER_JITTER,
    AttemptsExhausted,
    DispatchClient,
    DispatcherRefused,
    DispatchError,
    parse_retry_after,
)
from service.dispatch.example_worker import build_example_worker
from service.dispatch.schemas import UNKNOWN_REQUEST_IDX
from service.dispatch.signing import Assignment, KeyRing, Signer, publish

DISPATCHER = "http://dispatcher:8081"
WORKER_URL = "http://worker-1:8000"
ENDPOINT = "my-endpoint"
API_KEY = "dk_client"
WORKER_TOKEN = "wt_worker"
COST = 25.0
TTL_MS = 30_000
FIRST_IDX = 41
SEED = 1234
LOADING = {"ready": 0, "busy": 0, "loading": 2, "error": 0, "stopped": 0, "inactive": 0}
WAIT_TIMEOUT_S = 5.0
SLOW_REPORTS_S = 600.0  # a report interval no wait in these tests reaches: a report seen came at once
PACE_S = 0.05

# Scripted steps: what the fake dispatcher answers to one /route/, what a fake worker answers to one call.
ASSIGN = "assign"
NO_READY = "no_ready"
Step = str | httpx.Response | Exception


class FakeDispatch:
    """A dispatcher and its workers behind one MockTransport, answering from scripts."""

    def __init__(self, signer: Signer, routes: list[Step], workers: list[Step] | None = None) -> None:
        self.signer = signer
        self.routes = list(routes)
        self.workers = list(workers or [])
        self.route_calls: list[dict[str, Any]] = []
        self.route_keys: list[str | None] = []  # each route call's Idempotency-Key
        self.worker_calls: list[dict[str, Any]] = []
        self.reqnum = 0
        self.next_idx = FIRST_IDX

    def handle(self, request: httpx.Request) -> httpx.Response:
        if request.url.host == "dispatcher":
            assert request.headers["authorization"] == f"Bearer {API_KEY}"
            assert request.url.path == "/route/"
            self.route_keys.append(request.headers.get("idempotency-key"))
            return self.answer_route(orjson.loads(request.content))
        self.worker_calls.append(orjson.loads(request.content))
        return self.play(self.workers.pop(0))

    def answer_route(self, body: dict[str, Any]) -> httpx.Response:
        self.route_calls.append(body)
        step = self.routes.pop(0)
        idx = body.get("request_idx")
        if idx is None and step in (ASSIGN, NO_READY):
            idx, self.next_idx = self.next_idx, self.next_idx + 1
        if step == NO_READY:
            return httpx.Response(200, json={"endpoint": ENDPOINT, "status": LOADING, "request_idx": idx})
        if step == ASSIGN:
            assert isinstance(idx, int)
            return httpx.Response(200, json=self.assigned(idx, body["cost"]))
        return self.play(step)

    def assigned(self, request_idx: int, cost: float) -> dict[str, Any]:
        self.reqnum += 1
        a = Assignment(
            endpoint=ENDPOINT,
            url=WORKER_URL,
            cost=cost,
            reqnum=self.reqnum,
            request_idx=request_idx,
            expires_at_ms=int(time.time() * 1000) + TTL_MS,
            key_id=self.signer.key_id,
        )
        return {**dataclasses.asdict(a), "signature": self.signer.sign(a), "__request_id": "r"}

    @staticmethod
    def play(step: Step) -> httpx.Response:
        if isinstance(step, Exception):
            raise step
        assert isinstance(step, httpx.Response)
        return step


class FakeSleep:
    def __init__(self) -> None:
        self.delays: list[float] = []

    async def __call__(self, delay: float) -> None:
        self.delays.append(delay)


@pytest.fixture
def signer() -> Signer:
    return Signer.generate()


@pytest.fixture
def sleep() -> FakeSleep:
    return FakeSleep()


@pytest.fixture
async def make_client(sleep: FakeSleep) -> AsyncIterator[Callable[..., DispatchClient]]:
    opened: list[httpx.AsyncClient] = []

    def make(fake: FakeDispatch, **options: Any) -> DispatchClient:
        http = httpx.AsyncClient(transport=httpx.MockTransport(fake.handle))
        opened.append(http)
        options = {"rng": random.Random(SEED), "sleep": sleep, **options}
        return DispatchClient(DISPATCHER, API_KEY, http=http, **options)

    yield make
    for http in opened:
        await http.aclose()


def ok(body: object) -> httpx.Response:
    return httpx.Response(200, json=body)


def error(status: int, code: str, headers: dict[str, str] | None = None) -> httpx.Response:
    return httpx.Response(status, json={"error": {"code": code, "message": code}}, headers=headers)


# -- the happy path ----------------------------------------------------------------------------------------------
async def test_a_workers_json_answer_keeps_big_integers_exact(signer: Signer, make_client: Any) -> None:
    big = 2**64 + 1  # orjson would hand this back as a float
    fake = FakeDispatch(signer, [ASSIGN], [httpx.Response(200, content=b'{"id": %d}' % big)])
    response = await make_client(fake).request(ENDPOINT, "/generate", {"prompt": "hi"}, COST)
    assert response.json() == {"id": big}


async def test_a_request_is_routed_and_sent_with_its_assignment(signer: Signer, make_client: Any) -> None:
    fake = FakeDispatch(signer, [ASSIGN], [ok({"answer": 42})])
    response = await make_client(fake).request(ENDPOINT, "/generate", {"prompt": "hi"}, COST)
    assert (response.status, response.json(), response.attempts) == (200, {"answer": 42}, 1)
    assert response.assignment.request_idx == FIRST_IDX
    assert fake.route_calls == [{"endpoint": ENDPOINT, "cost": COST}]
    sent = fake.worker_calls[0]
    assert sent["payload"] == {"prompt": "hi"}
    assert sent["auth_data"] == dict(response.route_answer)


async def test_route_returns_the_raw_answer(signer: Signer, make_client: Any) -> None:
    fake = FakeDispatch(signer, [NO_READY, ASSIGN])
    client = make_client(fake)
    assert (await client.route(ENDPOINT, COST))["status"] == LOADING
    answer = await client.route(ENDPOINT, COST, request_idx=FIRST_IDX)
    assert answer["url"] == WORKER_URL
    assert fake.route_calls[1] == {"endpoint": ENDPOINT, "cost": COST, "request_idx": FIRST_IDX}


# -- retries ----------------------------------------------------------------------------------------------------
async def test_every_retry_reuses_the_request_idx(signer: Signer, make_client: Any, sleep: FakeSleep) -> None:
    routes: list[Step] = [NO_READY, error(503, "store_unavailable"), httpx.ConnectError("down"), *[ASSIGN] * 4]
    workers: list[Step] = [
        error(503, "overloaded"),
        httpx.ConnectError("refused"),
        error(401, "invalid_assignment"),
        ok({"done": True}),
    ]
    fake = FakeDispatch(signer, routes, workers)
    response = await make_client(fake).request(ENDPOINT, "/generate", {}, COST)
    assert (response.status, response.attempts) == (200, len(routes))
    assert "request_idx" not in fake.route_calls[0]
    assert [call["request_idx"] for call in fake.route_calls[1:]] == [FIRST_IDX] * (len(routes) - 1)
    assert response.assignment.request_idx == FIRST_IDX
    assert len(sleep.delays) == len(routes) - 1


async def test_backoff_is_full_jitter_and_bounded(signer: Signer, make_client: Any, sleep: FakeSleep) -> None:
    attempts, base, cap = 8, 0.1, 0.5
    fake = FakeDispatch(signer, [ASSIGN] * attempts, [httpx.Response(503)] * attempts)
    client = make_client(fake, max_attempts=attempts, backoff_base_s=base, backoff_max_s=cap)
    with pytest.raises(AttemptsExhausted):
        await client.request(ENDPOINT, "/generate", {}, COST)
    reference = random.Random(SEED)
    expected = [reference.uniform(0.0, min(cap, base * 2 ** (retry - 1))) for retry in range(1, attempts)]
    assert sleep.delays == pytest.approx(expected)
    assert all(0.0 <= delay <= cap for delay in sleep.delays)


async def test_no_ready_answers_are_polled_for_the_waiting_time_not_the_attempts(
    signer: Signer, make_client: Any, sleep: FakeSleep
) -> None:
    """Counted among the attempts, no-ready answers made the client give up after about 5 s of a worker's cold
    start (which takes minutes), leaving its request open at the dispatcher until the request ttl."""
    fake = FakeDispatch(signer, [NO_READY] * 30 + [ASSIGN], [ok({"done": True})])
    response = await make_client(fake, max_attempts=2, backoff_max_s=0.5).request(ENDPOINT, "/generate", {}, COST)
    assert (response.status, response.attempts) == (200, 31)
    waiting = FakeDispatch(signer, [NO_READY] * 100)
    client = make_client(waiting, wait_for_worker_s=2.0, backoff_base_s=0.2, backoff_max_s=0.5)
    sleep.delays.clear()
    with pytest.raises(AttemptsExhausted, match="no ready worker"):
        await client.request(ENDPOINT, "/generate", {}, COST)
    assert 1.5 <= sum(sleep.delays) <= 2.0 and len(waiting.route_calls) < 100


def test_a_zero_back_off_is_refused() -> None:
    """No-ready polls are budgeted by the back-off they wait: with none, 2563 route calls went out in 3 s, without
    end."""
    for options in ({"backoff_base_s": 0.0}, {"backoff_max_s": 0.0}, {"backoff_base_s": 1e-9}):
        with pytest.raises(ValueError, match=r"back-off times must be at least 0\.001 s"):
            DispatchClient(DISPATCHER, API_KEY, **options)


async def test_backoff_cap_holds_for_any_retry_count() -> None:
    async with DispatchClient(DISPATCHER, API_KEY, backoff_max_s=2.0) as client:
        assert all(0.0 <= client.backoff_delay(retry) <= 2.0 for retry in (1, 10, 100, 10_000))
        waits = [client.backoff_delay(3, retry_after_s=100.0) for _ in range(200)]
        # Retry-After is capped at retry_after_max_s (30), then stretched at random so refused clients spread out
        assert all(30.0 <= wait <= 30.0 * (1 + RETRY_AFTER_JITTER) for wait in waits)
        assert len(set(waits)) == len(waits)


async def test_a_retry_after_of_zero_still_backs_off(signer: Signer, make_client: Any, sleep: FakeSleep) -> None:
    """Retry-After: 0 made every retry immediate: a busy loop against a struggling worker."""
    fake = FakeDispatch(signer, [ASSIGN, ASSIGN], [httpx.Response(503, headers={"Retry-After": "0"}), ok({})])
    await make_client(fake, backoff_base_s=0.25).request(ENDPOINT, "/generate", {}, COST)
    [delay] = sleep.delays
    assert 0.25 <= delay <= 0.25 * (1 + RETRY_AFTER_JITTER)


async def test_a_worker_url_httpx_refuses_is_retried_not_raised(signer: Signer, make_client: Any) -> None:
    """Only transport errors were caught: a URL httpx refuses escaped request() raw."""
    fake = FakeDispatch(signer, [ASSIGN, ASSIGN], [httpx.InvalidURL("Invalid port: 'x:1'"), ok({"answer": 1})])
    response = await make_client(fake).request(ENDPOINT, "/generate", {}, COST)
    assert (response.status, response.attempts) == (200, 2)


def unreadable() -> httpx.Response:
    return httpx.Response(200, headers={"content-encoding": "gzip"}, stream=httpx.ByteStream(b"not gzip"))


async def test_a_worker_answer_that_arrived_unreadable_is_a_dispatch_error_not_a_retry(
    signer: Signer, make_client: Any
) -> None:
    """A broken encoding escaped raw as httpx.DecodingError. It is not retried either: the worker's work may be done
    (it ran again on every retry)."""
    fake = FakeDispatch(signer, [ASSIGN, ASSIGN], [unreadable(), ok({})])
    with pytest.raises(DispatchError, match="answered 200 unreadably: DecodingError"):
        await make_client(fake).request(ENDPOINT, "/generate", {}, COST)
    assert len(fake.route_calls) == 1


class CutOff(httpx.AsyncByteStream):
    """A body that breaks off after its first bytes (the worker's connection dropped mid-answer)."""

    async def __aiter__(self) -> AsyncIterator[bytes]:
        yield b'{"result": "do'
        raise httpx.RemoteProtocolError("peer closed connection without sending complete message body")


def cut_off(status: int) -> httpx.Response:
    return httpx.Response(status, headers={"content-length": "100"}, stream=CutOff())


async def test_a_worker_answer_cut_off_after_its_status_is_not_run_again(signer: Signer, make_client: Any) -> None:
    """A transport error after the status line was retried as if nothing had arrived: the worker's work, done once
    (it answered 200), ran again on every attempt."""
    fake = FakeDispatch(signer, [ASSIGN, ASSIGN], [cut_off(200), ok({})])
    with pytest.raises(DispatchError, match="answered 200 unreadably: RemoteProtocolError"):
        await make_client(fake).request(ENDPOINT, "/generate", {}, COST)
    assert len(fake.route_calls) == 1


class Endless(httpx.AsyncByteStream):
    """An answer that never ends: any URL a worker token reported can send one."""

    def __init__(self) -> None:
        self.sent = 0

    async def __aiter__(self) -> AsyncIterator[bytes]:
        while True:
            self.sent += 1
            yield b"x" * 1024


async def test_a_worker_answer_is_read_up_to_a_limit(signer: Signer, make_client: Any) -> None:
    """It was read whole into memory: an endless answer ran the client out of memory."""
    endless = Endless()
    fake = FakeDispatch(signer, [ASSIGN, ASSIGN], [httpx.Response(200, stream=endless), ok({})])
    with pytest.raises(DispatchError, match="answered over 65536 bytes"):
        await make_client(fake, max_response_bytes=64 * 1024).request(ENDPOINT, "/generate", {}, COST)
    assert endless.sent == 65 and len(fake.route_calls) == 1  # not retried: the work may be done
    fits = FakeDispatch(signer, [ASSIGN], [ok({"answer": "y" * 100})])
    response = await make_client(fits, max_response_bytes=1024).request(ENDPOINT, "/generate", {}, COST)
    assert response.json() == {"answer": "y" * 100}


async def test_a_retryable_worker_status_with_its_body_cut_off_is_retried(signer: Signer, make_client: Any) -> None:
    fake = FakeDispatch(signer, [ASSIGN, ASSIGN], [cut_off(503), ok({"answer": 1})])
    response = await make_client(fake).request(ENDPOINT, "/generate", {}, COST)
    assert (response.status, response.attempts, response.json()) == (200, 2, {"answer": 1})


async def test_every_route_call_of_a_request_carries_its_idempotency_key(signer: Signer, make_client: Any) -> None:
    """A first route whose answer could not be read (or never came) reserved load under a request_idx the client
    never learnt: the repeat names the same request by its key, and the dispatcher takes it as a retry."""
    fake = FakeDispatch(signer, [unreadable(), httpx.ReadTimeout("lost"), NO_READY, ASSIGN], [ok({})])
    client = make_client(fake)
    response = await client.request(ENDPOINT, "/generate", {}, COST)
    assert (response.status, response.attempts) == (200, 4)
    key = fake.route_keys[0]
    assert key and fake.route_keys == [key] * 4
    assert [call.get("request_idx") for call in fake.route_calls] == [None, None, None, FIRST_IDX]
    fake.routes.append(ASSIGN)
    fake.workers.append(ok({}))
    await client.request(ENDPOINT, "/generate", {}, COST)
    assert fake.route_keys[4] not in (None, key)  # the next request has a key of its own


async def test_retry_after_from_the_dispatcher_is_honoured(signer: Signer, make_client: Any, sleep: FakeSleep) -> None:
    routes: list[Step] = [
        error(503, "store_unavailable", {"Retry-After": "2"}),
        error(429, "rate_limited", {"Retry-After": "600"}),
        ASSIGN,
    ]
    fake = FakeDispatch(signer, routes, [ok({})])
    response = await make_client(fake, retry_after_max_s=10.0).request(ENDPOINT, "/generate", {}, COST)
    assert response.attempts == len(routes)
    assert len(sleep.delays) == 2
    for delay, floor in zip(sleep.delays, (2.0, 10.0), strict=True):
        assert floor <= delay <= floor * (1 + RETRY_AFTER_JITTER)


async def test_a_request_idx_the_dispatcher_forgot_is_routed_as_a_new_request(signer: Signer, make_client: Any) -> None:
    forgotten = httpx.Response(
        400,
        json={"error": {"code": "invalid_request", "message": "unknown request_idx", "reason": UNKNOWN_REQUEST_IDX}},
    )
    # the worker fails, and by the retry the dispatcher has forgotten the request (TTL, or a restart on memory state)
    fake = FakeDispatch(signer, [ASSIGN, forgotten, ASSIGN], [httpx.Response(503), ok({"answer": 1})])
    response = await make_client(fake).request(ENDPOINT, "/generate", {}, COST)
    assert (response.status, response.attempts) == (200, 3)
    assert [call.get("request_idx") for call in fake.route_calls] == [None, FIRST_IDX, None]
    assert response.assignment.request_idx == FIRST_IDX + 1


async def test_other_dispatcher_400s_are_not_retried(signer: Signer, make_client: Any) -> None:
    fake = FakeDispatch(signer, [ASSIGN, error(400, "invalid_request")], [httpx.Response(503)])
    with pytest.raises(DispatcherRefused) as refused:
        await make_client(fake).request(ENDPOINT, "/generate", {}, COST)
    assert (refused.value.status, refused.value.reason, len(fake.route_calls)) == (400, None, 2)


async def test_giving_up_says_why(signer: Signer, make_client: Any) -> None:
    fake = FakeDispatch(signer, [NO_READY, ASSIGN, ASSIGN], [error(502, "bad_gateway")] * 2)
    with pytest.raises(DispatchError) as caught:
        await make_client(fake, max_attempts=2).request(ENDPOINT, "/generate", {}, COST)
    exc = caught.value
    assert isinstance(exc, AttemptsExhausted)
    assert (exc.attempts, exc.request_idx, exc.last_status) == (3, FIRST_IDX, LOADING)
    assert "loading=2" in str(exc) and "502" in str(exc) and str(FIRST_IDX) in str(exc)


@pytest.mark.parametrize("status", [400, 401, 403, 404])
async def test_dispatcher_client_errors_are_not_retried(
    signer: Signer, make_client: Any, sleep: FakeSleep, status: int
) -> None:
    fake = FakeDispatch(signer, [error(status, "nope"), ASSIGN])
    with pytest.raises(DispatcherRefused) as caught:
        await make_client(fake).request(ENDPOINT, "/generate", {}, COST)
    assert (caught.value.status, caught.value.code) == (status, "nope")
    assert (len(fake.route_calls), sleep.delays) == (1, [])


async def test_worker_client_errors_are_returned_as_they_are(signer: Signer, make_client: Any) -> None:
    unauthorised = error(401, "unauthorized")  # a 401 that is not about the assignment
    fake = FakeDispatch(signer, [ASSIGN, ASSIGN], [error(422, "bad_prompt"), unauthorised])
    client = make_client(fake)
    first = await client.request(ENDPOINT, "/generate", {}, COST)
    second = await client.request(ENDPOINT, "/generate", {}, COST)
    assert (first.status, first.attempts, first.json()["error"]["code"]) == (422, 1, "bad_prompt")
    assert (second.status, second.attempts) == (401, 1)


async def test_a_malformed_route_answer_is_an_error(signer: Signer, make_client: Any) -> None:
    fake = FakeDispatch(signer, [ok({"url": WORKER_URL}), ok({"url": WORKER_URL, "request_idx": 1})])
    client = make_client(fake)
    with pytest.raises(DispatchError, match="request_idx"):
        await client.request(ENDPOINT, "/generate", {}, COST)
    with pytest.raises(DispatchError, match="not a valid assignment"):
        await client.request(ENDPOINT, "/generate", {}, COST)
    assert fake.worker_calls == []


def test_retry_after_parsing() -> None:
    now = datetime(2025, 1, 1, tzinfo=UTC)
    later = format_datetime(now + timedelta(seconds=7), usegmt=True)
    assert parse_retry_after(later, now=now.timestamp()) == pytest.approx(7.0)
    assert (parse_retry_after("3"), parse_retry_after("1.5"), parse_retry_after("-1")) == (3.0, 1.5, 0.0)
    assert (parse_retry_after(None), parse_retry_after("soon")) == (None, None)


# -- end to end with the example worker -------------------------------------------------------------------------
class HostRouter(httpx.AsyncBaseTransport):
    """Sends each request to the transport for its host."""

    def __init__(self, by_host: dict[str, httpx.AsyncBaseTransport]) -> None:
        self.by_host = by_host

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        return await self.by_host[request.url.host].handle_async_request(request)


class FakeDispatcherForWorker(FakeDispatch):
    """Also serves what a worker calls: ``/pubkey/``, ``/worker_status/``, ``/delete_requests/``."""

    def __init__(self, signer: Signer) -> None:
        super().__init__(signer, [])
        self.reports: list[dict[str, Any]] = []
        self.deleted: list[dict[str, Any]] = []

    def handle(self, request: httpx.Request) -> httpx.Response:
        path = request.url.path
        if path == "/pubkey/":
            keys = [key.to_json() for key in publish(self.signer)]
            return ok({"algorithm": "ed25519", "key_id": self.signer.key_id, "keys": keys})
        if path in ("/worker_status/", "/delete_requests/"):
            assert request.headers["authorization"] == f"Bearer {WORKER_TOKEN}"
            (self.reports if path == "/worker_status/" else self.deleted).append(orjson.loads(request.content))
            return ok({"ok": True, "heartbeat_timeout_s": 30.0, "reqnum": self.reqnum})
        ready = any(report["state"] == "ready" for report in self.reports)
        self.routes.append(ASSIGN if ready else NO_READY)
        return super().handle(request)


class PacedDispatcher(FakeDispatcherForWorker):
    """Answers as a real dispatcher takes time: ``/pubkey/`` (counted) and ``/delete_requests/`` after a moment, so
    that concurrent callers overlap; ``/worker_status/`` only while ``open_reports`` is set."""

    def __init__(self, signer: Signer) -> None:
        super().__init__(signer)
        self.open_reports = asyncio.Event()
        self.open_reports.set()
        self.key_fetches = 0

    async def handle_async(self, request: httpx.Request) -> httpx.Response:
        path = request.url.path
        if path == "/worker_status/":
            await self.open_reports.wait()
        elif path == "/pubkey/":
            self.key_fetches += 1
            await asyncio.sleep(PACE_S)
        elif path == "/delete_requests/":
            await asyncio.sleep(2 * PACE_S)
        return self.handle(request)


def example_worker(dispatcher_http: httpx.AsyncClient, **options: Any) -> Starlette:
    """The example worker as ``w1`` at ``WORKER_URL``, talking to the fake dispatcher through ``dispatcher_http``."""
    return build_example_worker(dispatcher_url=DISPATCHER, endpoint=ENDPOINT, worker_id="w1", own_url=WORKER_URL,
                                worker_token=WORKER_TOKEN, http=dispatcher_http, **options)  # fmt: skip


async def wait_for(condition: Callable[[], bool]) -> None:
    deadline = time.monotonic() + WAIT_TIMEOUT_S
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.01)


@asynccontextmanager
async def running_worker(
    dispatcher: FakeDispatcherForWorker,
) -> AsyncIterator[tuple[httpx.AsyncClient, DispatchClient]]:
    """The example worker (lifespan running, keys fetched, reported ready) and a client routing to it."""
    async with httpx.AsyncClient(transport=httpx.MockTransport(dispatcher.handle)) as worker_http:
        app = example_worker(worker_http, max_perf=50.0)
        transport = HostRouter(
            {"dispatcher": httpx.MockTransport(dispatcher.handle), "worker-1": httpx.ASGITransport(app=app)}
        )
        async with (
            app.router.lifespan_context(app),
            httpx.AsyncClient(transport=transport) as http,
            DispatchClient(DISPATCHER, API_KEY, http=http, backoff_base_s=0.01) as client,
        ):
            await wait_for(lambda: bool(dispatcher.reports))
            yield http, client


async def test_end_to_end_with_the_example_worker(signer: Signer) -> None:
    dispatcher = FakeDispatcherForWorker(signer)
    issued_before_start = dispatcher.assigned(FIRST_IDX - 1, COST)  # e.g. served by a previous worker process
    async with running_worker(dispatcher) as (http, client):
        old = await http.post(f"{WORKER_URL}/echo", json={"auth_data": issued_before_start})
        assert (old.status_code, old.json()["error"]["reason"]) == (503, "issued_before_start")
        response = await client.request(ENDPOINT, "/echo", {"text": "hello"}, COST)
        assert response.status == 200, response.body
        echoed = response.json()
        assert echoed == {
            "worker_id": "w1",
            "reqnum": response.assignment.reqnum,
            "request_idx": response.assignment.request_idx,
            "payload": {"text": "hello"},
        }
        await wait_for(lambda: bool(dispatcher.deleted))
        assert dispatcher.deleted == [
            {"endpoint": ENDPOINT, "id": "w1", "request_idxs": [echoed["request_idx"]], "success": True}
        ]
        # the same signed assignment cannot be used twice
        replay = await http.post(f"{WORKER_URL}/echo", json={"auth_data": dict(response.route_answer)})
        assert replay.status_code == 401
        assert replay.json()["error"]["reason"] == "replayed"
    assert dispatcher.reports[0] == {
        "endpoint": ENDPOINT,
        "id": "w1",
        "url": WORKER_URL,
        "state": "ready",
        "max_perf": 50.0,
        "cur_load": 0.0,
        "in_flight": 0,
    }
    assert dispatcher.reports[-1]["state"] == "stopped"


async def test_the_example_worker_names_its_reqnum_floor_at_once_and_in_every_later_report(signer: Signer) -> None:
    """The dispatcher gives back the load of the requests a previous process under this id held when it hears the
    floor: the report naming it goes right after the first, not a report interval later."""
    dispatcher = FakeDispatcherForWorker(signer)
    dispatcher.assigned(FIRST_IDX, COST)  # issued to a previous process: the first answer's reqnum is the floor
    async with httpx.AsyncClient(transport=httpx.MockTransport(dispatcher.handle)) as worker_http:
        app = example_worker(worker_http, report_interval_s=SLOW_REPORTS_S)
        async with app.router.lifespan_context(app):
            await wait_for(lambda: len(dispatcher.reports) >= 2)
            assert app.state.worker.reqnum_floor == dispatcher.reqnum == 1
    assert "reqnum_floor" not in dispatcher.reports[0]
    assert [report.get("reqnum_floor") for report in dispatcher.reports[1:]] == [1] * (len(dispatcher.reports) - 1)
    assert [report["state"] for report in dispatcher.reports] == ["ready", "ready", "stopped"]


async def test_a_key_rotation_is_picked_up_by_the_worker_before_it_answers(signer: Signer) -> None:
    """The worker fetches the keys on an unknown key id and verifies again: the first attempt is served (it used
    to refuse it, and only a client that retries, not Vast's SDK, got through)."""
    dispatcher = FakeDispatcherForWorker(signer)
    async with running_worker(dispatcher) as (_http, client):
        dispatcher.signer = Signer.generate()  # the dispatcher now signs (and publishes) a key the worker lacks
        response = await client.request(ENDPOINT, "/echo", {"n": 1}, COST)
    assert response.status == 200, response.body
    assert response.attempts == 1 and len(dispatcher.route_calls) == 1
    assert response.assignment.key_id == dispatcher.signer.key_id


async def test_the_example_worker_serves_echo_with_a_trailing_slash_and_refuses_numbers_past_a_double(
    signer: Signer,
) -> None:
    """/echo/ was verified (its reqnum used up), then redirected by Starlette: the request was lost and its load held
    for the request ttl. A payload of 1e400 became inf, which no JSON answer carries: a 500, retried 8 times."""
    dispatcher = FakeDispatcherForWorker(signer)
    async with running_worker(dispatcher) as (http, _client):
        for path, idx in (("/echo/", FIRST_IDX), ("/echo//", FIRST_IDX + 2)):
            slash = await http.post(f"{WORKER_URL}{path}", json={"auth_data": dispatcher.assigned(idx, COST)})
            assert slash.status_code == 200, (path, slash.text)
        huge = b'{"auth_data": %s, "payload": 1e400}' % orjson.dumps(dispatcher.assigned(FIRST_IDX + 1, COST))
        refused = await http.post(f"{WORKER_URL}/echo", content=huge, headers={"content-type": "application/json"})
        assert (refused.status_code, refused.json()["error"]["code"]) == (400, "invalid_request")
        await wait_for(lambda: sum(len(d["request_idxs"]) for d in dispatcher.deleted) == 2)


async def test_the_example_worker_sends_served_requests_releases_before_it_stops(signer: Signer) -> None:
    """Shutdown cancelled releases still on their way: the loads stayed held until the request ttl."""
    dispatcher = PacedDispatcher(signer)
    async with httpx.AsyncClient(transport=httpx.MockTransport(dispatcher.handle_async)) as worker_http:
        app = example_worker(worker_http)
        async with app.router.lifespan_context(app):
            await wait_for(lambda: app.state.worker.keys_loaded)
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url=WORKER_URL) as http:
                served = await http.post("/echo", json={"auth_data": dispatcher.assigned(FIRST_IDX, COST)})
            assert served.status_code == 200 and dispatcher.deleted == []
    assert [d["request_idxs"] for d in dispatcher.deleted] == [[FIRST_IDX]]
    assert dispatcher.reports[-1]["state"] == "stopped"


async def test_the_example_worker_releases_a_burst_in_few_calls(signer: Signer) -> None:
    """One release call per request: a burst of 1000 took 3.8 s of calls, and the worker's reports queued behind
    them in the same connection pool until the dispatcher took the worker for dead."""
    dispatcher = FakeDispatcherForWorker(signer)
    async with running_worker(dispatcher) as (http, _client):
        served = await asyncio.gather(
            *(http.post(f"{WORKER_URL}/echo", json={"auth_data": dispatcher.assigned(FIRST_IDX + i, COST)})
              for i in range(200))
        )  # fmt: skip
        assert [r.status_code for r in served] == [200] * 200
        await wait_for(lambda: sum(len(d["request_idxs"]) for d in dispatcher.deleted) == 200)
    released = [idx for d in dispatcher.deleted for idx in d["request_idxs"]]
    assert sorted(released) == [FIRST_IDX + i for i in range(200)]
    assert len(dispatcher.deleted) <= 5  # gathered over RELEASE_BATCH_S


async def test_a_worker_given_its_keys_accepts_work_only_after_its_first_report(signer: Signer) -> None:
    """With a keyring passed in it served at once, before the first report set its replay floor: an assignment the
    previous process had served was accepted again."""
    dispatcher = PacedDispatcher(signer)
    dispatcher.open_reports.clear()
    served_before = dispatcher.assigned(FIRST_IDX, COST)  # the dispatcher's last reqnum: a previous process's
    async with httpx.AsyncClient(transport=httpx.MockTransport(dispatcher.handle_async)) as worker_http:
        app = example_worker(worker_http, keyring=KeyRing([signer.public_key]))
        worker_transport = httpx.ASGITransport(app=app)
        async with (
            app.router.lifespan_context(app),
            httpx.AsyncClient(transport=worker_transport, base_url=WORKER_URL) as http,
        ):
            try:
                health = (await http.get("/health")).status_code
                early = (await http.post("/echo", json={"auth_data": served_before})).status_code
            finally:
                dispatcher.open_reports.set()  # else the worker's shutdown waits on its "stopped" report for ever
            assert (health, early) == (503, 503)  # no key yet: route it again
            await wait_for(lambda: app.state.worker.keys_loaded)
            again = await http.post("/echo", json={"auth_data": served_before})
            assert (again.status_code, again.json()["error"]["reason"]) == (503, "issued_before_start")
            fresh = await http.post("/echo", json={"auth_data": dispatcher.assigned(FIRST_IDX + 1, COST)})
            assert fresh.status_code == 200, fresh.text


async def test_unknown_keys_share_one_fetch_and_fetch_at_most_every_gap(signer: Signer) -> None:
    """Forged key ids are free: one fetch serves every request waiting on it, and another waits out the gap."""
    dispatcher = PacedDispatcher(signer)
    async with httpx.AsyncClient(transport=httpx.MockTransport(dispatcher.handle_async)) as worker_http:
        app = example_worker(worker_http)
        worker = app.state.worker
        async with app.router.lifespan_context(app):
            await wait_for(lambda: worker.keys_loaded)
            fetched_at_start = dispatcher.key_fetches
            results = await asyncio.gather(*(worker.refresh_for_unknown_key() for _ in range(5)))
            assert results == [True] * 5 and dispatcher.key_fetches == fetched_at_start + 1
            assert await worker.refresh_for_unknown_key() is False  # within the gap: refused without a fetch
            assert dispatcher.key_fetches == fetched_at_start + 1


class FlakyReleases(FakeDispatcherForWorker):
    """Answers ``/delete_requests/`` with the given statuses first (a Redis blip: 503), then as usual."""

    def __init__(self, signer: Signer, statuses: list[int]) -> None:
        super().__init__(signer)
        self.statuses = statuses
        self.release_calls = 0

    def handle(self, request: httpx.Request) -> httpx.Response:
        if request.url.path == "/delete_requests/":
            self.release_calls += 1
            if self.statuses:
                status = self.statuses.pop(0)
                return httpx.Response(status, json={"error": {"code": "store_unavailable", "message": "blip"}})
        return super().handle(request)


@pytest.mark.parametrize(
    ("statuses", "calls", "delivered"),
    [([503, 502], 3, True), ([503, 503, 503, 503], 4, False), ([400], 1, False)],
)
async def test_the_example_worker_retries_a_release_the_dispatcher_failed(
    signer: Signer, monkeypatch: pytest.MonkeyPatch, statuses: list[int], calls: int, delivered: bool
) -> None:
    """One 503 during a Redis restart held the request's load until the request ttl (600 s); a 4xx is not retried:
    sending it again changes nothing."""
    monkeypatch.setattr(example_worker_module, "RELEASE_RETRY_FIRST_S", 0.001)
    dispatcher = FlakyReleases(signer, statuses)
    async with httpx.AsyncClient(transport=httpx.MockTransport(dispatcher.handle)) as worker_http:
        app = example_worker(worker_http)
        async with app.router.lifespan_context(app):
            await wait_for(lambda: app.state.worker.keys_loaded)
            if delivered:
                await app.state.worker.release([FIRST_IDX])
            else:
                with pytest.raises(httpx.HTTPStatusError):
                    await app.state.worker.release([FIRST_IDX])
    assert dispatcher.release_calls == calls
    assert [d["request_idxs"] for d in dispatcher.deleted] == ([[FIRST_IDX]] if delivered else [])


class MalformedKeysFirst(FakeDispatcherForWorker):
    """Answers ``/pubkey/`` with an empty key list at first (a dispatcher mid-deploy, say)."""

    def __init__(self, signer: Signer, bad_answers: int) -> None:
        super().__init__(signer)
        self.bad_answers = bad_answers

    def handle(self, request: httpx.Request) -> httpx.Response:
        if request.url.path == "/pubkey/" and self.bad_answers > 0:
            self.bad_answers -= 1
            return ok({"algorithm": "ed25519", "keys": []})
        return super().handle(request)


async def test_a_malformed_pubkey_answer_is_retried_not_fatal(signer: Signer) -> None:
    dispatcher = MalformedKeysFirst(signer, bad_answers=2)
    async with running_worker(dispatcher) as (_, client):  # returns once the worker has reported ready
        assert dispatcher.bad_answers == 0
        response = await client.request(ENDPOINT, "/echo", {"n": 1}, cost=COST)
    assert response.status == 200


def test_example_worker_takes_its_token_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    from service.dispatch.example_worker import WORKER_TOKEN_ENV, parse_args

    base = ["--dispatcher", "http://127.0.0.1:1", "--endpoint", "ep", "--port", "0"]
    monkeypatch.delenv(WORKER_TOKEN_ENV, raising=False)
    with pytest.raises(SystemExit):
        parse_args(base)  # no token anywhere
    monkeypatch.setenv(WORKER_TOKEN_ENV, "wt_from_env")
    assert parse_args(base).worker_token == "wt_from_env"
    assert parse_args([*base, "--worker-token", "wt_flag"]).worker_token == "wt_flag"

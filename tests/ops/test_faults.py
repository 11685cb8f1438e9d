"""Faults under load: the dispatcher's Redis killed and restarted on the same port, then a worker killed. Clients
route, call the worker with the signed assignment (the example worker refuses a replayed reqnum), and retry with
their request_idx when the worker is gone."""

from __future__ import annotations

import asyncio
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.e2e.conftest import Server
from tests.e2e.test_dispatcher_http import ENDPOINT, Deployment, ready_workers, wait_for
from tests.ops.conftest import Record
from tests.redis_server import RedisServer

pytestmark = pytest.mark.ops

HEARTBEAT_TIMEOUT_S = 1.5  # the example workers report every 0.3 s
CLIENTS = 8
STEADY_S = 1.5
REDIS_DOWN_S = 2.0
RECOVERY_BOUND_S = 10.0
EXCLUSION_SLACK_S = 1.0  # scheduling noise on a shared machine, on top of the heartbeat timeout
BACKOFF_S = 0.05


@dataclass
class Ledger:
    """Everything the clients saw, with client-side times."""

    assignments: list[tuple[float, str, int, int]] = field(default_factory=list)  # (at, url, reqnum, request_idx)
    unavailable: list[tuple[float, str | None, str | None]] = field(default_factory=list)  # (at, code, Retry-After)
    no_ready: list[float] = field(default_factory=list)
    worker_failures: list[tuple[float, str]] = field(default_factory=list)  # (at, url): the worker was gone
    retries: list[tuple[str, str, int]] = field(default_factory=list)  # (failed url, new url, request_idx)
    completed: int = 0
    unexpected: list[str] = field(default_factory=list)


async def test_redis_restart_and_a_dead_worker_under_load(
    tmp_path: Path, deployment: Deployment, record: Record
) -> None:
    redis_server = RedisServer(tmp_path / "redis")  # no persistence: a restart loses every counter
    redis_server.start()
    dispatcher = deployment.dispatcher(
        "--redis-url", redis_server.url, "--heartbeat-timeout-s", str(HEARTBEAT_TIMEOUT_S),
        "--autoscale-interval-s", "0.5",
    )  # fmt: skip
    workers = [deployment.worker(dispatcher, f"w{i}") for i in (1, 2)]
    ledger = Ledger()
    stop = asyncio.Event()
    try:
        await asyncio.to_thread(wait_for, lambda: ready_workers(dispatcher, deployment.api_key, 2), "two workers")
        load = asyncio.gather(*(_client(dispatcher, deployment, ledger, stop) for _ in range(CLIENTS)))
        await asyncio.sleep(STEADY_S)
        assert ledger.completed > 0, ledger.unexpected

        killed_at = time.monotonic()
        redis_server.kill()
        await asyncio.sleep(REDIS_DOWN_S)
        await asyncio.to_thread(redis_server.start)  # same port, empty
        restarted_at = time.monotonic()
        while not any(at > restarted_at for at, *_ in ledger.assignments):
            assert time.monotonic() - restarted_at < RECOVERY_BOUND_S, "routing did not recover after the restart"
            await asyncio.sleep(0.02)
        recovered_after_s = time.monotonic() - restarted_at
        await asyncio.sleep(STEADY_S)

        # One request certainly meets the dead worker: routed before the kill, sent to its worker after it. (The
        # clients alone may not: the victim can hold more unreleased load than the survivor when it dies, and then
        # gets no new request before its heartbeat runs out.)
        async with httpx.AsyncClient(timeout=30) as http:
            held = await _route(http, dispatcher, deployment, ledger)
            victim = next(w for w in workers if w.url == held["url"])
            survivor = next(w for w in workers if w is not victim)
            victim.process.send_signal(signal.SIGKILL)
            dead_at = time.monotonic()
            await asyncio.to_thread(victim.process.wait)
            with pytest.raises(httpx.TransportError):
                await _call_worker(http, held)
            ledger.worker_failures.append((time.monotonic(), victim.url))
            retried = await _route(http, dispatcher, deployment, ledger, held["request_idx"])
            ledger.retries.append((victim.url, retried["url"], held["request_idx"]))
            assert (await _call_worker(http, retried)).status_code == 200
        await asyncio.sleep(HEARTBEAT_TIMEOUT_S + EXCLUSION_SLACK_S + STEADY_S)
        stop.set()
        await asyncio.wait_for(load, 60)
    finally:
        stop.set()
        for worker in workers:
            worker.stop()
        dispatcher_code = dispatcher.stop()
        redis_server.stop()
    assert dispatcher_code == 0, dispatcher.log()
    assert not ledger.unexpected, ledger.unexpected[:5]

    # Redis down: a clear 503 with Retry-After, only while it was down (plus the restart itself)
    assert ledger.unavailable, "no 503 while Redis was down"
    for at, code, retry_after in ledger.unavailable:
        assert code == "store_unavailable" and retry_after is not None and int(retry_after) >= 1
        assert killed_at <= at <= restarted_at + RECOVERY_BOUND_S
    # no (worker, reqnum) was ever issued twice, and each worker's reqnums only grew across the restart
    pairs = [(url, reqnum) for _, url, reqnum, _ in ledger.assignments]
    assert len(pairs) == len(set(pairs))
    spanning = 0  # workers assigned requests both before the kill and after the restart
    for url in {url for url, _ in pairs}:
        before = [reqnum for at, u, reqnum, _ in ledger.assignments if u == url and at < killed_at]
        after = [reqnum for at, u, reqnum, _ in ledger.assignments if u == url and at > restarted_at]
        if before and after:
            assert min(after) > max(before), url
            spanning += 1
    assert spanning >= 1, "no worker was assigned requests on both sides of the Redis restart"
    # the dead worker: excluded within its heartbeat timeout; every request it lost landed on the survivor
    to_victim = [at for at, url, *_ in ledger.assignments if url == victim.url and at > dead_at]
    excluded_after_s = max(to_victim, default=dead_at) - dead_at
    assert excluded_after_s <= HEARTBEAT_TIMEOUT_S + EXCLUSION_SLACK_S, excluded_after_s
    assert ledger.worker_failures and all(url == victim.url for _, url in ledger.worker_failures)
    assert ledger.retries and all((failed, new) == (victim.url, survivor.url) for failed, new, _ in ledger.retries)
    assert any(at > dead_at + HEARTBEAT_TIMEOUT_S + EXCLUSION_SLACK_S for at, *_ in ledger.assignments)
    record(
        clients=CLIENTS,
        requests_completed_by_a_worker=ledger.completed,
        assignments=len(ledger.assignments),
        unique_worker_reqnums=len(set(pairs)),
        redis_down_s=REDIS_DOWN_S,
        store_unavailable_503=len(ledger.unavailable),
        no_ready_worker_answers=len(ledger.no_ready),
        recovered_after_restart_s=round(recovered_after_s, 2),
        heartbeat_timeout_s=HEARTBEAT_TIMEOUT_S,
        dead_worker_excluded_after_s=round(excluded_after_s, 2),
        requests_retried_with_request_idx=len(ledger.retries),
        faults_survived="redis SIGKILL + restart (no persistence), worker SIGKILL",
        requests_lost=0,
    )


async def _route(
    http: httpx.AsyncClient, dispatcher: Server, deployment: Deployment, ledger: Ledger, request_idx: int | None = None
) -> dict[str, Any]:
    """One assignment (a retry with ``request_idx``), recorded in the ledger."""
    body: dict[str, Any] = {"endpoint": ENDPOINT, "cost": 1.0}
    if request_idx is not None:
        body["request_idx"] = request_idx
    answer = await http.post(
        f"{dispatcher.url}/route/", json=body, headers={"authorization": f"Bearer {deployment.api_key}"}
    )
    assignment: dict[str, Any] = answer.json()
    assert answer.status_code == 200 and "url" in assignment, assignment
    ledger.assignments.append((time.monotonic(), assignment["url"], assignment["reqnum"], assignment["request_idx"]))
    return assignment


async def _call_worker(http: httpx.AsyncClient, assignment: dict[str, Any]) -> httpx.Response:
    return await http.post(f"{assignment['url']}/echo", json={"auth_data": assignment, "payload": {"n": 1}})


async def _client(dispatcher: Server, deployment: Deployment, ledger: Ledger, stop: asyncio.Event) -> None:
    """Route, call the worker with the assignment; on a dead worker, route again with the same request_idx."""
    auth = {"authorization": f"Bearer {deployment.api_key}"}
    async with httpx.AsyncClient(timeout=30) as http:
        request_idx: int | None = None  # set while retrying a request whose worker was gone
        failed_url = ""
        while not stop.is_set():
            body: dict[str, Any] = {"endpoint": ENDPOINT, "cost": 1.0}
            if request_idx is not None:
                body["request_idx"] = request_idx
            answer = await http.post(f"{dispatcher.url}/route/", json=body, headers=auth)
            now = time.monotonic()
            if answer.status_code == 503:
                ledger.unavailable.append((now, answer.json()["error"]["code"], answer.headers.get("retry-after")))
                await asyncio.sleep(BACKOFF_S)
                continue
            if answer.status_code != 200:
                ledger.unexpected.append(f"route {answer.status_code}: {answer.text}")
                return
            assignment = answer.json()
            if "url" not in assignment:  # no ready worker (after the restart, until the workers report again)
                ledger.no_ready.append(now)
                await asyncio.sleep(BACKOFF_S)
                continue
            url = assignment["url"]
            ledger.assignments.append((now, url, assignment["reqnum"], assignment["request_idx"]))
            if request_idx is not None:
                ledger.retries.append((failed_url, url, request_idx))
            try:
                echo = await _call_worker(http, assignment)
            except httpx.TransportError:
                ledger.worker_failures.append((time.monotonic(), url))
                request_idx, failed_url = assignment["request_idx"], url
                continue
            if echo.status_code != 200:
                ledger.unexpected.append(f"worker {url} answered {echo.status_code}: {echo.text}")
                return
            ledger.completed += 1
            request_idx = None

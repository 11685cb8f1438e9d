"""Graceful drain under load, for both services: SIGTERM while clients keep sending. Readiness turns 503 at once,
every request admitted before the signal is answered 200, later ones are refused (503 ``shutting_down`` with
Retry-After, or a refused connection once the listener is closed), and the process exits 0 within its drain
timeout plus Hypercorn's connection grace."""

from __future__ import annotations

import asyncio
import signal
import time
from pathlib import Path

import httpx
import pytest
import redis

from service.http.server import CONNECTION_CLOSE_GRACE_S
from tests.e2e.conftest import Server, start_server
from tests.e2e.test_dispatcher_http import ENDPOINT, Deployment
from tests.e2e.test_router_lifecycle import LONG_PROMPT, _wait_for_admitted
from tests.ops.conftest import Record
from tests.ops.load import Outcome, closed_loop
from tests.redis_server import RedisServer

pytestmark = pytest.mark.ops

DRAIN_TIMEOUT_S = 30.0
READINESS_BOUND_S = 2.0  # "at once", on a shared 2-core machine
LATE_S = 1.0  # a request sent this long after SIGTERM was certainly sent to a draining server
# A request sent just before SIGTERM may still wait for the server's loop (a loaded 2-core machine: 70 ms seen) and be
# read, so refused, once draining began: only one sent earlier than this is certainly admitted before the signal.
READ_LAG_S = 0.25
REDIS_PAUSE_MS = 500  # below the dispatcher's 1 s Redis socket timeout


async def test_router_drains_every_admitted_request_under_load(tmp_path: Path, record: Record) -> None:
    server = start_server(
        tmp_path, "--max-batch-size", "8", "--cache-size", "0", "--drain-timeout-s", str(DRAIN_TIMEOUT_S)
    )
    clients = 32

    async def send(http: httpx.AsyncClient, client: int, n: int) -> httpx.Response:
        return await http.post("/v1/route", json={"prompt": f"{LONG_PROMPT} client {client} request {n}"})

    async with httpx.AsyncClient(base_url=server.url, timeout=60) as probe:
        await _wait_for_admitted(probe, lambda n: n == 0)  # started
        outcomes: list[Outcome] = []
        load = asyncio.ensure_future(
            closed_loop(server.url, send, clients=clients, stop=asyncio.Event(), outcomes=outcomes)
        )
        await _wait_for_admitted(probe, lambda n: n >= clients // 2)
        await asyncio.sleep(1.0)  # a while of steady load
        admitted_at_signal = await _admitted(probe)
        figures = await _sigterm_and_watch(server, "/v1/route", {"prompt": "sent after SIGTERM"})
    await asyncio.wait_for(load, DRAIN_TIMEOUT_S + 30)
    _check_outcomes(outcomes, figures["signalled_at"])
    assert admitted_at_signal >= clients // 2  # queued and in-flight work existed when the signal came
    record(service="router", clients=clients, admitted_at_sigterm=admitted_at_signal, **_summary(outcomes, figures))


async def test_dispatcher_drains_every_admitted_route_under_load(
    tmp_path: Path, deployment: Deployment, record: Record
) -> None:
    """Routes take well under a millisecond, so Redis is paused (CLIENT PAUSE) around the signal: the routes then
    waiting on it are the in-flight work the drain must finish."""
    with RedisServer(tmp_path / "redis") as redis_server:
        server = deployment.dispatcher(
            "--redis-url", redis_server.url, "--drain-timeout-s", str(DRAIN_TIMEOUT_S), "--autoscale-interval-s", "0.5"
        )
        report = {"endpoint": ENDPOINT, "id": "w0", "url": "http://10.0.0.1:8000", "state": "ready", "max_perf": 1e9}
        worker = {"authorization": f"Bearer {deployment.worker_token}"}
        async with httpx.AsyncClient() as http:
            assert (await http.post(f"{server.url}/worker_status/", json=report, headers=worker)).status_code == 200
        clients = 16
        auth = {"authorization": f"Bearer {deployment.api_key}"}

        async def send(http: httpx.AsyncClient, client: int, n: int) -> httpx.Response:
            return await http.post("/route/", json={"endpoint": ENDPOINT, "cost": 1.0}, headers=auth)

        outcomes: list[Outcome] = []
        load = asyncio.ensure_future(
            closed_loop(server.url, send, clients=clients, stop=asyncio.Event(), outcomes=outcomes)
        )
        deadline = time.monotonic() + 30
        while len(outcomes) < 10 * clients:  # a while of steady load
            assert time.monotonic() < deadline and not load.done(), f"{len(outcomes)} routes answered"
            await asyncio.sleep(0.05)
        with redis.Redis(port=redis_server.port) as control:
            control.client_pause(REDIS_PAUSE_MS)  # every route sent from now on waits in the dispatcher
        await asyncio.sleep(0.15)
        figures = await _sigterm_and_watch(server, "/route/", {"endpoint": ENDPOINT, "cost": 1.0}, headers=auth)
        await asyncio.wait_for(load, DRAIN_TIMEOUT_S + 30)
    signalled = figures["signalled_at"]
    _check_outcomes(outcomes, signalled)
    in_flight = sum(1 for o in outcomes if o.sent_at < signalled < o.done_at and o.status == 200)
    assert in_flight >= clients // 2, in_flight  # answered after the signal, admitted before it
    assert all("url" in (o.body or {}) for o in outcomes if o.status == 200)
    record(service="dispatcher (redis)", clients=clients, in_flight_at_sigterm=in_flight, **_summary(outcomes, figures))


async def _admitted(probe: httpx.AsyncClient) -> int:
    text = (await probe.get("/metrics")).text
    return int(float(text.split("\nrouter_admitted_prompts ")[1].split("\n")[0]))


async def _sigterm_and_watch(
    server: Server, path: str, body: dict[str, object], *, headers: dict[str, str] | None = None
) -> dict[str, float]:
    """SIGTERM, then: how soon /health answers 503, that a new request gets 503 ``shutting_down`` with Retry-After
    while ``/livez`` stays 200, and how long until the process exits (with code 0). The probes go out while admitted
    work is still open (the listener closes once it is done)."""
    async with httpx.AsyncClient(base_url=server.url, timeout=30) as probe:
        signalled_at = time.monotonic()
        server.process.send_signal(signal.SIGTERM)
        await asyncio.sleep(0.05)  # the server's loop handles the signal before our request arrives

        async def unready_after_s() -> float:
            while (health := await probe.get("/health")).status_code == 200:
                assert time.monotonic() - signalled_at < DRAIN_TIMEOUT_S, "/health never turned 503"
            assert (health.status_code, health.json()["status"]) == (503, "draining")
            return time.monotonic() - signalled_at

        refused, livez, unready_s = await asyncio.gather(
            probe.post(path, json=body, headers=headers), probe.get("/livez"), unready_after_s()
        )
    assert (refused.status_code, refused.json()["error"]["code"]) == (503, "shutting_down"), refused.text
    # draining is a reason to leave the balancer, not to be restarted by the orchestrator
    assert (livez.status_code, livez.json()) == (200, {"status": "alive"}), livez.text
    assert int(refused.headers["retry-after"]) >= 1
    code = await asyncio.to_thread(server.process.wait, DRAIN_TIMEOUT_S + CONNECTION_CLOSE_GRACE_S + 30)
    exited_after_s = time.monotonic() - signalled_at
    assert code == 0, server.log()
    assert "drained" in server.log() and "drain timeout" not in server.log()
    assert unready_s < READINESS_BOUND_S, unready_s
    assert exited_after_s < DRAIN_TIMEOUT_S + CONNECTION_CLOSE_GRACE_S, exited_after_s
    return {"signalled_at": signalled_at, "unready_after_s": unready_s, "exited_after_s": exited_after_s}


def _check_outcomes(outcomes: list[Outcome], signalled_at: float) -> None:
    """Before the signal (by more than the server's read lag): every request answered 200. After it: 200 (admitted
    as the signal landed), 503 ``shutting_down`` with Retry-After, or a connection the closed listener refused; never
    anything else."""
    drained_at = max(o.done_at for o in outcomes if o.status == 200)  # the last admitted request answered
    for o in outcomes:
        if o.sent_at < signalled_at - READ_LAG_S:
            assert o.status == 200, f"admitted before SIGTERM, answered {o.status} {o.code} {o.error}"
        elif o.status == 503:
            assert o.code == "shutting_down" and o.retry_after is not None, o
        elif o.status is None:
            # sent after the signal and cut off only once the drain was over (the server closing its listener
            # and keep-alive connections): it was never admitted
            assert o.error in {"ConnectError", "RemoteProtocolError", "ReadError", "WriteError"}, o
            assert o.done_at >= drained_at - 0.1, f"{o} cut off before the drain was over"
        else:
            assert o.status == 200 and o.sent_at < signalled_at + LATE_S, o


def _summary(outcomes: list[Outcome], figures: dict[str, float]) -> dict[str, object]:
    before = [o for o in outcomes if o.sent_at < figures["signalled_at"]]
    return {
        "requests": len(outcomes),
        "admitted_before_sigterm_answered_200": f"{sum(o.status == 200 for o in before)}/{len(before)}",
        "refused_503_after": sum(o.status == 503 for o in outcomes),
        "refused_connection_after": sum(o.status is None for o in outcomes),
        "requests_lost": sum(o.status != 200 for o in before),
        "health_503_after_s": round(figures["unready_after_s"], 3),
        "exit_0_after_s": round(figures["exited_after_s"], 2),
        "drain_timeout_s": DRAIN_TIMEOUT_S,
    }

"""Start-up, admission limit, hot reload, graceful drain and several workers, each on its own server."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import shutil
import signal
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import numpy as np

from service.router.weights import RouterWeights, default_weights_path, load_weights, save_weights
from tests.e2e.conftest import STARTUP_TIMEOUT_S, start_server

LONG_PROMPT = "Explain in detail how a transformer encoder computes attention over a sequence. " * 12


def test_listens_at_once_and_answers_503_until_ready(tmp_path: Path) -> None:
    server = start_server(tmp_path, wait=False)
    try:
        seen: list[tuple[int, str]] = []
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while time.monotonic() < deadline:
            try:
                r = httpx.post(f"{server.url}/v1/route", json={"prompt": "hello"}, timeout=5)
            except httpx.TransportError:
                time.sleep(0.02)
                continue
            seen.append((r.status_code, r.json().get("error", {}).get("code", "")))
            if r.status_code == 200:
                break
            assert r.headers["retry-after"]
            time.sleep(0.02)
        assert seen[0] == (503, "router_not_ready")
        assert seen[-1][0] == 200
    finally:
        assert server.stop() == 0, server.log()


async def test_full_queue_answers_429_with_retry_after(tmp_path: Path) -> None:
    server = start_server(tmp_path, "--max-queue", "4", "--max-batch-size", "1", "--cache-size", "0")
    try:
        async with httpx.AsyncClient(base_url=server.url, timeout=120,
                                     limits=httpx.Limits(max_connections=64)) as client:  # fmt: skip
            responses = await asyncio.gather(
                *(client.post("/v1/route", json={"prompt": f"{LONG_PROMPT} {i}"}) for i in range(64))
            )
            queue_after = (await client.get("/health")).json()["queue"]
        statuses = [r.status_code for r in responses]
        assert set(statuses) == {200, 429}
        assert statuses.count(429) > 0 and statuses.count(200) >= 4
        for r in responses:
            if r.status_code == 429:
                assert r.json()["error"]["code"] == "overloaded"
                assert r.headers["retry-after"] == "1"
        assert queue_after == 0
    finally:
        assert server.stop() == 0, server.log()


def _shifted(weights: RouterWeights, delta: float) -> RouterWeights:
    return RouterWeights(
        models=weights.models,
        centroids=weights.centroids,
        expected_error=np.clip(weights.expected_error + delta, 0, 1).astype(np.float32),
        cost_per_1k=weights.cost_per_1k,
        default_lambda=weights.default_lambda,
        embedder_id=weights.embedder_id,
        embedder_sha256=weights.embedder_sha256,
        metadata=weights.metadata,
    )


def test_hot_reload_by_admin_endpoint_and_sighup(tmp_path: Path) -> None:
    live = tmp_path / "live.safetensors"
    shutil.copy(default_weights_path(), live)
    original = load_weights(live)
    server = start_server(tmp_path, "--weights", str(live), "--admin-token", "tok")
    auth = {"authorization": "Bearer tok"}
    try:
        prompt = {"prompt": "Is a whale a fish or a mammal?", "cost_weight": 0.0}
        first = httpx.post(f"{server.url}/v1/route", json=prompt).json()
        assert first["weights_version"] == original.version

        # a good file through the admin endpoint
        newer = _shifted(original, 0.01)
        new_path = tmp_path / "newer.safetensors"
        save_weights(newer, new_path)
        r = httpx.post(f"{server.url}/admin/reload", json={"path": str(new_path)}, headers=auth)
        assert r.status_code == 200, r.text
        second = httpx.post(f"{server.url}/v1/route", json=prompt).json()
        assert second["weights_version"] == newer.version
        assert second["cache_hit"] is False  # the cache was cleared
        assert second["expected_error"] > first["expected_error"]

        # a bad file: rejected, the previous weights keep serving
        bad = tmp_path / "bad.safetensors"
        bad.write_bytes(new_path.read_bytes()[:100])
        r = httpx.post(f"{server.url}/admin/reload", json={"path": str(bad)}, headers=auth)
        assert r.status_code == 400
        assert httpx.get(f"{server.url}/health").json()["weights_version"] == newer.version
        assert httpx.post(f"{server.url}/admin/reload", json={"path": str(new_path)}).status_code == 401

        # SIGHUP re-reads the configured file
        third_weights = _shifted(original, 0.02)
        save_weights(third_weights, live)
        server.process.send_signal(signal.SIGHUP)
        _wait_for_version(server.url, third_weights.version)
        # SIGHUP with a broken configured file leaves the weights in place
        live.write_bytes(b"garbage")
        server.process.send_signal(signal.SIGHUP)
        time.sleep(1.0)
        assert httpx.get(f"{server.url}/health").json()["weights_version"] == third_weights.version
        assert httpx.post(f"{server.url}/v1/route", json=prompt).status_code == 200
    finally:
        assert server.stop() == 0, server.log()
    assert "SIGHUP reload rejected" in server.log()


def _wait_for_version(url: str, version: str, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while httpx.get(f"{url}/health").json().get("weights_version") != version:
        assert time.monotonic() < deadline, "reload did not happen"
        time.sleep(0.05)


async def test_sigterm_drains_admitted_work_then_exits(tmp_path: Path) -> None:
    server = start_server(tmp_path, "--max-batch-size", "8")
    url = server.url
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=httpx.Limits(max_connections=100)) as client:
        tasks = [
            asyncio.ensure_future(client.post("/v1/route", json={"prompt": f"{LONG_PROMPT} drain {i}"}))
            for i in range(60)
        ]
        await _wait_for_admitted(client, lambda n: n >= 60)
        server.process.send_signal(signal.SIGTERM)
        await asyncio.sleep(0.2)
        assert not all(t.done() for t in tasks)  # there is work left to drain
        health = await client.get("/health")
        assert (health.status_code, health.json()["status"]) == (503, "draining")
        refused = await client.post("/v1/route", json={"prompt": "arrived after SIGTERM"})
        assert refused.status_code == 503
        assert refused.json()["error"]["code"] == "shutting_down"
        assert refused.headers["connection"] == "close"  # a kept-alive connection would be cut at exit, mid-request
        responses = await asyncio.gather(*tasks)
    assert [r.status_code for r in responses] == [200] * 60
    # those answered after the SIGTERM close their connections too: a next request on one would be cut at exit
    assert sum(r.headers.get("connection") == "close" for r in responses) > 0
    assert await asyncio.to_thread(server.process.wait, 60) == 0
    assert "drained" in server.log()


async def test_drain_timeout_answers_the_requests_still_waiting_with_503(tmp_path: Path) -> None:
    """Past ``--drain-timeout-s`` the prompts still queued get a JSON 503 with Retry-After, not a cut connection or
    an empty 500 from the server's cancelling them."""
    server = start_server(tmp_path, "--drain-timeout-s", "1", "--max-batch-size", "1", "--compute-threads", "1")
    async with httpx.AsyncClient(base_url=server.url, timeout=120, limits=httpx.Limits(max_connections=100)) as client:
        tasks = [
            asyncio.ensure_future(client.post("/v1/route", json={"prompt": f"{LONG_PROMPT} timeout {i}"}))
            for i in range(80)  # the pool keeps connections free for polling /metrics
        ]
        await _wait_for_admitted(client, lambda n: n >= 80)  # 80 forward passes queued: seconds of work
        server.process.send_signal(signal.SIGTERM)
        responses = await asyncio.gather(*tasks)
    statuses = [r.status_code for r in responses]
    assert set(statuses) <= {200, 503}, statuses
    assert statuses.count(503) > 0 and statuses.count(200) > 0
    for r in responses:
        if r.status_code == 503:
            assert r.json()["error"]["code"] == "shutting_down"
            assert r.headers["retry-after"]
    assert await asyncio.to_thread(server.process.wait, 60) == 0
    log = server.log()
    assert "waiting requests answered 503" in log
    assert "CancelledError" not in log


def test_several_workers_share_one_port(tmp_path: Path) -> None:
    server = start_server(tmp_path, "--workers", "2")
    try:
        for i in range(20):
            r = httpx.post(f"{server.url}/v1/route", json={"prompt": f"worker test {i}"}, timeout=30)
            assert r.status_code == 200
        assert httpx.get(f"{server.url}/health").status_code == 200
    finally:
        assert server.stop() == 0, server.log()
    assert server.log().count("router ready") == 2


def test_metrics_of_several_workers_are_merged(tmp_path: Path) -> None:
    """With ``--workers 2`` a scrape lands on either process; each must answer for the whole server (the
    processes' counters summed, the per-process gauges too), or counters would jump between scrapes."""
    server = start_server(tmp_path, "--workers", "2", "--max-queue", "100")
    try:
        routes = 30
        for i in range(routes):  # a fresh connection each: the requests spread over both processes
            r = httpx.post(f"{server.url}/v1/route", json={"embedding": [0.05 * (i + 1)] + [0.05] * 383})
            assert r.status_code == 200
        for _ in range(6):  # fresh connections again: whichever process answers
            text = httpx.get(f"{server.url}/metrics").text
            ok = 'method="POST",route="/v1/route",status="200"'
            assert _labelled(text, "router_http_requests_total", ok) == routes
            assert _metric(text, "router_max_queue") == 200  # two processes' admission limits
            assert _metric(text, "router_ready") == 1
            assert _labelled(text, "router_http_request_duration_seconds_count", 'route="/v1/route"') == routes
    finally:
        assert server.stop() == 0, server.log()


def _labelled(text: str, name: str, labels: str) -> float:
    return float(text.split(f"\n{name}{{{labels}}} ")[1].split("\n")[0])


def test_admin_reload_reaches_every_worker_process(tmp_path: Path) -> None:
    """With ``--workers 2`` a reload through one worker must not leave the other on the old weights (answers would
    flip between versions from request to request); a path other than the configured file is refused."""
    live = tmp_path / "live.safetensors"
    shutil.copy(default_weights_path(), live)
    original = load_weights(live)
    server = start_server(tmp_path, "--workers", "2", "--weights", str(live))
    try:
        newer = _shifted(original, 0.01)
        elsewhere = tmp_path / "elsewhere.safetensors"
        save_weights(newer, elsewhere)
        refused = httpx.post(f"{server.url}/admin/reload", json={"path": str(elsewhere)})
        assert refused.status_code == 409, refused.text
        assert refused.json()["error"]["code"] == "conflict"
        assert str(live) in refused.json()["error"]["message"]

        save_weights(newer, live)
        r = httpx.post(f"{server.url}/admin/reload")
        assert r.status_code == 200, r.text
        assert (r.json()["weights_version"], r.json()["workers"]) == (newer.version, 2)
        # each connection may land on either worker: poll on fresh connections until both serve the new weights
        deadline = time.monotonic() + 30
        versions: list[str] = []
        while True:
            versions = [httpx.get(f"{server.url}/health").json()["weights_version"] for _ in range(20)]
            if set(versions) == {newer.version}:
                break
            assert time.monotonic() < deadline, versions
            time.sleep(0.2)
        # each process swapped the file in once: the one that took the request validated it, then the signal came
        text = httpx.get(f"{server.url}/metrics").text
        assert _labelled(text, "router_weights_reloads_total", 'result="ok"') == 2
        assert "Removal of labels" not in server.log()
    finally:
        assert server.stop() == 0, server.log()
    assert server.log().count(f"SIGHUP reload: now serving {newer.version}") == 2  # the parent reached both workers


async def test_prompts_of_departed_clients_are_dropped_before_compute(tmp_path: Path) -> None:
    server = start_server(tmp_path, "--max-batch-size", "1", "--compute-threads", "1")
    try:
        async with httpx.AsyncClient(base_url=server.url, timeout=0.5,
                                     limits=httpx.Limits(max_connections=40)) as client:  # fmt: skip
            results = await asyncio.gather(
                *(client.post("/v1/route", json={"prompt": f"{LONG_PROMPT} gone {i}"}) for i in range(40)),
                return_exceptions=True,
            )
        assert any(isinstance(r, httpx.TimeoutException) for r in results)  # these clients hung up
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:
            await _wait_for_admitted(client, lambda n: n == 0)
            metrics = (await client.get("/metrics")).text
        dropped = _metric(metrics, "router_dropped_prompts_total")
        computed = _metric(metrics, "router_batch_size_sum")
        assert dropped > 0
        assert dropped + computed == 40  # every prompt was either computed or dropped, never both
    finally:
        assert server.stop() == 0, server.log()


def _metric(text: str, name: str) -> float:
    return float(text.split(f"\n{name} ")[1].split("\n")[0])


async def _wait_for_admitted(client: httpx.AsyncClient, done: Callable[[float], bool], timeout_s: float = 60.0) -> None:
    """Poll /metrics until ``done(router_admitted_prompts)``."""
    deadline = time.monotonic() + timeout_s
    while not done(admitted := _metric((await client.get("/metrics")).text, "router_admitted_prompts")):
        assert time.monotonic() < deadline, f"{admitted} prompts admitted"
        await asyncio.sleep(0.01)


def _workers_of(parent: int) -> list[int]:
    """The spawned worker processes of ``parent`` (not multiprocessing's resource tracker)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            cmdline = (stat.parent / "cmdline").read_bytes()
        except (OSError, IndexError, ValueError):
            continue  # gone meanwhile
        if ppid == parent and b"spawn_main" in cmdline:
            found.append(int(stat.parent.name))
    return found


def _wait(condition: Callable[[], bool], what: str, timeout_s: float = STARTUP_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def test_a_reload_signal_while_workers_start_is_harmless_and_a_dead_worker_stops_the_server(tmp_path: Path) -> None:
    """A SIGHUP forwarded before a worker handled it killed that worker (and the port); a worker killed later went
    unnoticed, the rest answering /health 200 on half the capacity with the dead one's gauges merged."""
    server = start_server(tmp_path, "--workers", "2", wait=False)
    try:
        _wait(lambda: len(_workers_of(server.process.pid)) == 2, "two workers")
        server.process.send_signal(signal.SIGHUP)  # they are still importing
        server.wait_ready()
        victim, survivor = _workers_of(server.process.pid)
        os.kill(victim, signal.SIGKILL)
        assert server.process.wait(STARTUP_TIMEOUT_S) == 1
        _wait(lambda: not Path(f"/proc/{survivor}").exists(), "the other worker to drain and exit")
        assert "exited unasked" in server.log()
    finally:
        server.stop()


def test_workers_drain_when_their_supervisor_dies(tmp_path: Path) -> None:
    """Orphans kept serving, and an /admin/reload through one signalled whatever process had adopted it."""
    server = start_server(tmp_path, "--workers", "2")
    workers = _workers_of(server.process.pid)
    assert len(workers) == 2
    server.process.send_signal(signal.SIGKILL)
    server.process.wait()
    _wait(lambda: not any(Path(f"/proc/{pid}").exists() for pid in workers), "the orphaned workers to exit")


def test_weights_every_worker_fails_to_load_stop_a_server_of_several_with_exit_1(tmp_path: Path) -> None:
    """Weights that read fine but were fitted with another model fail each process's load: under ``--workers 2`` the
    server exits 1 for its process manager, where one process stays up answering 503 (``test_app``)."""
    weights = dataclasses.replace(load_weights(default_weights_path()), embedder_sha256="0" * 64)
    save_weights(weights, tmp_path / "other-model.safetensors")
    server = start_server(
        tmp_path, "--workers", "2", "--weights", str(tmp_path / "other-model.safetensors"), wait=False
    )
    try:
        assert server.process.wait(STARTUP_TIMEOUT_S) == 1, server.log()
        log = server.log()
        # the first to fail stops the other, which may not have got as far as failing itself
        assert "router failed to load" in log and "exited unasked (code 1)" in log
    finally:
        server.stop()

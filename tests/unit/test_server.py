from __future__ import annotations

import asyncio
import logging
import multiprocessing
import os
from pathlib import Path

import pytest
from hypercorn import config as hypercorn_config_module
from hypercorn.config import Config
from starlette.testclient import TestClient

from service.config import RouterSettings
from service.http.server import (
    OWNER_LOCK,
    EscapeControlCharacters,
    Fleet,
    ServiceConfig,
    _access_logger,
    _hold_owner_lock,
    hypercorn_config,
    sweep_dead_metrics_folders,
)
from service.router.weights import save_weights
from tests.fakes import toy_weights
from tests.unit.test_app import make_service, wait_ready


def test_fleet_is_ready_when_every_worker_is() -> None:
    counter = multiprocessing.get_context("spawn").Value("i", 0)
    first, second = Fleet(2, counter), Fleet(2, counter)
    assert not first.all_ready()
    first.mark_ready()
    first.mark_ready()  # once per worker
    assert not second.all_ready()
    second.mark_ready()
    assert first.all_ready() and second.all_ready()


def test_single_process_fleet() -> None:
    fleet = Fleet()
    assert not fleet.all_ready()
    fleet.mark_ready()
    assert fleet.all_ready()


def test_health_waits_for_sibling_workers(tmp_path: Path) -> None:
    path = tmp_path / "w.safetensors"
    save_weights(toy_weights(), path)
    counter = multiprocessing.get_context("spawn").Value("i", 0)
    service = make_service(path)
    service.fleet = Fleet(2, counter)
    with TestClient(service.asgi) as client:
        deadline_ok = False
        for _ in range(1000):
            if client.post("/v1/route", json={"prompt": "x"}).status_code == 200:
                deadline_ok = True
                break
        assert deadline_ok  # this worker serves...
        health = client.get("/health")
        assert (health.status_code, health.json()["status"]) == (503, "loading")  # ...but the server is not ready
        Fleet(2, counter).mark_ready()  # the sibling finishes loading
        wait_ready(client)


def test_hypercorn_config_from_settings() -> None:
    config = hypercorn_config(RouterSettings.from_env({}, host="0.0.0.0", port=9999))
    assert config.bind == ["0.0.0.0:9999"]
    assert config.accesslog is None
    assert config.backlog == RouterSettings.listen_backlog > 100  # Hypercorn's 100 overflowed under bursts
    assert hypercorn_config(RouterSettings.from_env({"LLMROUTER_LISTEN_BACKLOG": "64"})).backlog == 64
    assert config.keep_alive_timeout == 75.0  # above common load balancers' 60 s idle timeout: they close first
    # Google Cloud's load balancer keeps idle connections 600 s: the server must outlast it
    assert hypercorn_config(RouterSettings.from_env({"LLMROUTER_KEEP_ALIVE_S": "620"})).keep_alive_timeout == 620.0


def test_response_headers_are_hypercorns_made_once_a_second(monkeypatch: pytest.MonkeyPatch) -> None:
    now = [1_790_000_000.25]
    monkeypatch.setattr("service.http.server.time.time", lambda: now[0])
    monkeypatch.setattr(hypercorn_config_module, "time", lambda: now[0])
    config, stock = ServiceConfig(), Config()
    first = config.response_headers("h11")
    assert (
        first
        == stock.response_headers("h11")
        == [(b"date", b"Mon, 21 Sep 2026 14:13:20 GMT"), (b"server", b"hypercorn-h11")]
    )
    first.append((b"x-added", b"by a caller"))  # callers extend the list they get: the next one is unchanged
    now[0] += 0.7  # the same second
    assert config.response_headers("h11") == stock.response_headers("h11") != first
    assert config.response_headers("h2") == stock.response_headers("h2")  # per protocol
    now[0] += 0.1  # the next second: a new date
    assert config.response_headers("h11") == stock.response_headers("h11")
    assert config.response_headers("h11")[0] == (b"date", b"Mon, 21 Sep 2026 14:13:21 GMT")
    assert isinstance(hypercorn_config(RouterSettings.from_env({})), ServiceConfig)


def test_metrics_folders_of_dead_supervisors_are_swept(tmp_path: Path) -> None:
    """A supervisor killed with SIGKILL (an OOM kill) left its folder; in a container's /tmp, which outlives
    restarts, they piled up (27 of them on the dev box). A folder goes once its owner's lock can be taken: a pid
    could not tell (a restarted container's supervisor has the one before's pid; other pid namespaces)."""
    dead, live, foreign = (tmp_path / f"llmrouter-metrics-{name}" for name in ("dead", "live", "foreign"))
    for folder in (dead, live, foreign):
        folder.mkdir()
        (folder / "counter_1.db").write_bytes(b"\0" * 16)
    (dead / OWNER_LOCK).touch()  # its owner died: nobody holds the lock
    held = _hold_owner_lock(str(live))
    other = tmp_path / "metrics-2024-06-01"  # someone else's
    other.mkdir()
    try:
        assert sweep_dead_metrics_folders(str(tmp_path)) == 1
        assert not dead.exists() and live.is_dir() and foreign.is_dir() and other.is_dir()  # no lock: not ours
    finally:
        os.close(held)
    assert sweep_dead_metrics_folders(str(tmp_path)) == 1 and not live.exists()  # its owner gone now


def test_the_access_log_escapes_control_characters(caplog: pytest.LogCaptureFixture) -> None:
    """The path is logged percent-decoded: a URL with %0A wrote a forged line of the client's choosing into the log
    (a "200 POST /route/" from an address of its choice), %1B a terminal escape."""
    logger = _access_logger()
    _access_logger()  # asked again (each server start): still one filter
    assert sum(isinstance(f, EscapeControlCharacters) for f in logger.filters) == 1
    with caplog.at_level(logging.INFO, logger="hypercorn.access"):
        logger.info('%(h)s "%(m)s %(U)s"', {"h": "127.0.0.1", "m": "GET", "U": "/x\n2026 INFO forged\x1b[31m"})
    (record,) = caplog.records
    assert record.getMessage() == '127.0.0.1 "GET /x\\x0a2026 INFO forged\\x1b[31m"'
    assert EscapeControlCharacters().filter(logging.LogRecord("a", logging.INFO, "f", 1, "%d", ("x",), None))
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="hypercorn.access"):
        logger.info("%s", "C1 \x9b31m and \u2028 too")
    assert caplog.records[0].getMessage() == "C1 \\x9b31m and \\u2028 too"


def test_a_worker_process_serves_on_uvloop(monkeypatch: pytest.MonkeyPatch) -> None:
    """uvloop is a declared dependency for its speed: the worker's event loop is uvloop's, not asyncio's default."""
    import service.http.server as server

    loops: list[str] = []

    async def serve(*_: object) -> None:
        loops.append(type(asyncio.get_running_loop()).__module__)

    monkeypatch.setattr(server, "_serve", serve)
    monkeypatch.setattr(server, "hold_early_signals", lambda: None)  # the test process's own signals stay as they are
    monkeypatch.setattr(server, "configure_logging", lambda level: None)
    server.run_worker(lambda fleet: None, hypercorn_config(RouterSettings.from_env({})), None, Fleet())  # type: ignore[arg-type, return-value]
    assert loops and loops[0].startswith("uvloop"), loops

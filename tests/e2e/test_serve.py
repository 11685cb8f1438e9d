"""``python -m service serve``: the README's first command starts both services on their embedded defaults."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

from tests.e2e.conftest import REPO, STARTUP_TIMEOUT_S, STOP_TIMEOUT_S, free_port


def test_serve_starts_router_and_dispatcher_and_stops_both(tmp_path: Path) -> None:
    router_port, dispatcher_port = free_port(), free_port()
    log = (tmp_path / "serve.log").open("wb")
    process = subprocess.Popen(
        [sys.executable, "-m", "service", "serve", "--router-port", str(router_port),
         "--dispatcher-port", str(dispatcher_port)],
        cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        healthy: dict[int, dict[str, object]] = {}
        while len(healthy) < 2 and time.monotonic() < deadline:
            for port in (router_port, dispatcher_port):
                try:
                    answer = httpx.get(f"http://127.0.0.1:{port}/health", timeout=1)
                except httpx.TransportError:
                    continue
                if answer.status_code == 200:
                    healthy[port] = answer.json()
            time.sleep(0.1)
        assert set(healthy) == {router_port, dispatcher_port}, (tmp_path / "serve.log").read_text()
        assert healthy[router_port]["clusters"] == 100  # the shipped weights
        assert healthy[dispatcher_port]["store"] == "memory"
        route = httpx.post(f"http://127.0.0.1:{router_port}/v1/route", json={"prompt": "What is 2 + 2?"})
        assert route.status_code == 200 and route.json()["selected_model"]
    finally:
        process.send_signal(signal.SIGTERM)
        code = process.wait(STOP_TIMEOUT_S)
        log.close()
    assert code == 0, (tmp_path / "serve.log").read_text()
    for port in (router_port, dispatcher_port):
        try:
            httpx.get(f"http://127.0.0.1:{port}/health", timeout=1)
        except httpx.TransportError:
            continue
        raise AssertionError(f"port {port} still answers after serve exited")

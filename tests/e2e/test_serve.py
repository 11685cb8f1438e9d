"""``python -m service serve``: the README's first command starts both services on their embedded defaults."""

from __future__ import annotations

import os
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
        time.sleep(0.5)
        process.send_signal(signal.SIGHUP)  # forwarded while the children still import: it killed them
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


def test_serves_children_exit_when_it_dies(tmp_path: Path) -> None:
    """Killed outright (no signal to forward), it left both services serving as orphans."""
    process = _start_serve(tmp_path)
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while len(children := _children(process.pid)) < 2:
        assert time.monotonic() < deadline, "the two services never started"
        time.sleep(0.05)
    process.kill()
    process.wait()
    deadline = time.monotonic() + STOP_TIMEOUT_S
    while any(Path(f"/proc/{pid}").exists() for pid in children):
        assert time.monotonic() < deadline, "the orphaned services kept running"
        time.sleep(0.05)


def test_serve_exits_1_when_a_service_stops_unasked(tmp_path: Path) -> None:
    """One service stopped by someone else (exit 0, drained): serve stopped the other and exited 0, so a process
    manager restarting on failure left both down."""
    process = _start_serve(tmp_path)
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while not (dispatcher := [pid for pid in _children(process.pid) if _handles_sigterm(pid, b"serve-dispatcher")]):
            assert time.monotonic() < deadline, "the dispatcher never started"
            time.sleep(0.01)
        os.kill(dispatcher[0], signal.SIGTERM)  # it drains and exits 0
        code = process.wait(STOP_TIMEOUT_S)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert code == 1, (tmp_path / "serve.log").read_text()


def _handles_sigterm(pid: int, command: bytes) -> bool:
    """Whether process ``pid`` runs ``command`` and has a SIGTERM handler (before that, SIGTERM kills it)."""
    try:
        if command not in Path(f"/proc/{pid}/cmdline").read_bytes():
            return False
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    caught = next(line for line in status.splitlines() if line.startswith("SigCgt:"))
    return bool(int(caught.split()[1], 16) & (1 << (signal.SIGTERM - 1)))


def _start_serve(tmp_path: Path) -> subprocess.Popen[bytes]:
    """``python -m service serve`` on free ports, its output in ``serve.log``."""
    with (tmp_path / "serve.log").open("wb") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "service", "serve", "--router-port", str(free_port()),
             "--dispatcher-port", str(free_port())],
            cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip


def _children(parent: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == parent:
                found.append(int(stat.parent.name))
        except (OSError, IndexError, ValueError):
            continue  # gone meanwhile
    return found

"""Fixtures shared by every test directory."""

from __future__ import annotations

import gc
import signal
import uuid
from collections.abc import Iterator

import pytest

from tests.redis_server import INSTALL_HINT, RedisServer, redis_server_path


@pytest.fixture(autouse=True)
def _signal_dispositions() -> Iterator[None]:
    """A serve command called in process holds SIGTERM, SIGINT and SIGHUP while it starts
    (``service.http.server.hold_early_signals``): what pytest had is put back, so that later tests, and the
    processes they start (which inherit an ignored SIGHUP), begin as usual."""
    held = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
    saved = {sig: signal.getsignal(sig) for sig in held}
    yield
    for sig, handler in saved.items():
        signal.signal(sig, handler)


@pytest.fixture(autouse=True)
def _unfrozen_heap() -> Iterator[None]:
    """A service that becomes ready freezes the heap (``service.http.heap``): in a test process that would keep
    every earlier test's cyclic garbage for good, and tell a test nothing about its own service's freeze."""
    gc.unfreeze()
    yield
    gc.unfreeze()


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """One real redis-server for the session. Missing redis-server fails (not skips) the tests: CI installs it.
    Tests that kill a server start their own ``RedisServer`` instead of this one."""
    if redis_server_path() is None:
        pytest.fail(INSTALL_HINT, pytrace=False)
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def redis_url(redis_server: RedisServer) -> str:
    return redis_server.url


@pytest.fixture
def redis_prefix() -> str:
    """A key prefix of this test's own: tests share the server but never see each other's keys."""
    return f"test:{uuid.uuid4().hex}:"

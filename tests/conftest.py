"""Fixtures shared by every test directory."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest

from tests.redis_server import INSTALL_HINT, RedisServer, redis_server_path


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

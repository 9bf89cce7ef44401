"""Fixtures every test folder may use. This folder is on sys.path (rootdir conftest), so tests
import the shared plumbing as `harness`."""
from __future__ import annotations

import shutil
from collections.abc import Iterator

import pytest

from harness import RedisServer


@pytest.fixture
def own_redis(tmp_path) -> Iterator[RedisServer]:
    """A dedicated redis-server per test (~0.1 s) on a free port: kombu keeps global keys per
    database (unacked hash, restore mutex), so a worker or broker killed in one test must not
    affect the next, and the machine's 6379 is never touched."""
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed")
    server = RedisServer(tmp_path / "redis").start()
    try:
        yield server
    finally:
        server.kill()

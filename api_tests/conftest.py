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


def pytest_terminal_summary(terminalreporter, config) -> None:
    """pytest-randomly shuffles the order on every run; its header line is hidden under -q
    (as `make test` runs), so say at the end how to replay this order."""
    if not config.pluginmanager.hasplugin("randomly"):
        return
    seed = getattr(config.option, "randomly_seed", None)
    if isinstance(seed, int):
        terminalreporter.write_line(f"test order shuffled by pytest-randomly: replay it with --randomly-seed={seed} "
                                    "(or -p no:randomly for file order)")

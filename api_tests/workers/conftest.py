"""Fixtures for the worker tests; the machinery is in worker_harness.py."""
from __future__ import annotations

import secrets
import shutil
from collections.abc import Iterator

import pytest

from service.core.store import Store
from worker_harness import Env, RedisServer


@pytest.fixture
def redis_server(tmp_path) -> Iterator[RedisServer]:
    """One redis-server per test (~0.1 s): kombu keeps global keys per database (the unacked
    hash, the restore mutex), so a worker killed in one test must not affect the next."""
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed")
    server = RedisServer(tmp_path / "redis").start()
    try:
        yield server
    finally:
        server.kill()


@pytest.fixture
def world(tmp_path, redis_server) -> Iterator[Env]:
    env = Env(data_dir=tmp_path / "data", redis_url=redis_server.url, queue=f"training-{secrets.token_hex(4)}")
    env.data_dir.mkdir(parents=True)
    try:
        yield env
    finally:
        env.stop_all()


@pytest.fixture
def store(world: Env) -> Iterator[Store]:
    st = Store(world.db_url)
    try:
        yield st
    finally:
        st.close()



"""Fixtures for the worker tests; the machinery is in worker_harness.py."""
from __future__ import annotations

import secrets
from collections.abc import Iterator

import pytest

from service.core.store import Store
from worker_harness import Env


@pytest.fixture
def world(tmp_path, own_redis) -> Iterator[Env]:
    env = Env(data_dir=tmp_path / "data", redis_url=own_redis.url, queue=f"training-{secrets.token_hex(4)}")
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



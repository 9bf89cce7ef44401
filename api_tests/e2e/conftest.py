"""Fixtures of the whole-system tests. One deployment (API process with the engine on + one
worker process + the machine's Redis) is shared by every test of the session that does not
need to break something; tests that kill a component build their own (see e2e_harness)."""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis

from e2e_harness import SHARED_REDIS, Client, Proc, System, cleanup_broker, shared_redis_db, wait_for


def _redis_up() -> bool:
    try:
        return bool(redis.Redis.from_url(SHARED_REDIS, socket_connect_timeout=1).ping())
    except Exception:
        return False


@pytest.fixture(scope="session")
def demo_model(tmp_path_factory) -> Path:
    """The tiny ChatGLM3-format model `make run` serves without a GPU, built by our own code
    (the directory name is what the service reports as the base model's name)."""
    from service.models import build_demo_model
    return build_demo_model(tmp_path_factory.mktemp("models") / "chatglm3-demo")


@dataclass
class Deployment:
    system: System
    api: Proc
    worker: Proc
    base_model: str

    @property
    def url(self) -> str:
        return self.api.url

    def client(self, headers=None) -> Client:
        return Client(self.url) if headers is None else Client(self.url, headers)

    def redis(self) -> redis.Redis:
        return redis.Redis.from_url(self.system.redis_url)


@pytest.fixture(scope="session")
def deployment(tmp_path_factory, demo_model) -> Iterator[Deployment]:
    if not _redis_up():
        pytest.skip("the machine's Redis at 127.0.0.1:6379 is required for the e2e tests")
    system = System(root=tmp_path_factory.mktemp("deployment"), redis_url=f"{SHARED_REDIS}/{shared_redis_db()}",
                    base_model=demo_model,
                    # Small upload limits so the hostile corpus can cross them with little data.
                    overrides={"TUNESERVE_MAX_UPLOAD_BYTES": str(4 << 20), "TUNESERVE_MAX_LINE_BYTES": str(64 << 10)})
    api = system.start_api(wait=False)
    worker = system.start_worker(wait=False)  # both start at once: model loads overlap
    try:
        ready = system.wait_ready(api)
        wait_for(lambda: " ready." in worker.log() or not worker.alive(), 180, "worker ready",
                 diagnostics=lambda: worker.log()[-4000:])
        assert worker.alive(), worker.log()[-4000:]
        yield Deployment(system, api, worker, ready["base_model"])
    finally:
        system.stop_all()
        try:
            cleanup_broker(system.redis_url, system.queue)
        except Exception:  # best effort: the keys are this run's only
            pass



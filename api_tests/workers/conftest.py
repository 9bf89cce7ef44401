"""Harness for the worker tests: dedicated `redis-server` processes on free ports (never the
machine's shared 6379, which these tests kill and restart), real Celery worker processes
(`python -m celery -A workers.celery_app worker --pool=solo`) configured only through
TUNESERVE_* variables, and a SQLite store in the test's tmp dir shared with the workers."""
from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from service.core.config import Settings
from service.core.store import Store

REPO = Path(__file__).resolve().parents[2]
FIXTURE_MODEL = REPO / "api_tests" / "fixtures" / "chatglm3-tiny"
SAMPLE = REPO / "service" / "data" / "advertisegen_sample.jsonl"
SAMPLE_VAL = REPO / "service" / "data" / "advertisegen_sample_val.jsonl"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(predicate: Callable[[], object], timeout: float, what: str, interval: float = 0.1):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


class RedisServer:
    """A throwaway redis-server: no persistence, so a restart comes back EMPTY."""

    def __init__(self, workdir: Path, port: int | None = None):
        self.port = port or free_port()
        self.workdir = workdir
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> "RedisServer":
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(self.workdir), "--protected-mode", "no"],
            stdout=open(self.workdir / f"redis-{self.port}.log", "ab"), stderr=subprocess.STDOUT)
        wait_for(self.ping, 10, f"redis-server on {self.port}")
        return self

    def ping(self) -> bool:
        import redis

        try:
            return bool(redis.Redis(port=self.port, socket_connect_timeout=0.5).ping())
        except Exception:
            return False

    def client(self):
        import redis

        return redis.Redis(port=self.port)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)
        self.proc = None


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory) -> Iterator[RedisServer]:
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed")
    server = RedisServer(tmp_path_factory.mktemp("redis")).start()
    try:
        yield server
    finally:
        server.kill()


@dataclass
class Worker:
    proc: subprocess.Popen
    log_path: Path
    name: str

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.alive():
            self.proc.send_signal(sig)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


@dataclass
class Env:
    """One test's world: data dir, SQLite store, a unique queue, the worker settings."""
    data_dir: Path
    redis_url: str
    queue: str
    overrides: dict[str, str] = field(default_factory=dict)
    workers: list[Worker] = field(default_factory=list)

    @property
    def db_url(self) -> str:
        return f"sqlite:///{self.data_dir / 'tuneserve.db'}"

    def env(self, **extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("TUNESERVE_")}
        env.update({
            "TUNESERVE_DATA_DIR": str(self.data_dir),
            "TUNESERVE_DATABASE_URL": self.db_url,
            "TUNESERVE_REDIS_URL": self.redis_url,
            "TUNESERVE_TASK_QUEUE": self.queue,
            "TUNESERVE_DEVICE": "cpu",
            "TUNESERVE_HEARTBEAT_INTERVAL_S": "0.5",
            "TUNESERVE_HEARTBEAT_TIMEOUT_S": "5",
            "TUNESERVE_REAPER_INTERVAL_S": "1",
            "TUNESERVE_REQUEUE_GRACE_S": "2",
            "PYTHONPATH": str(REPO) + os.pathsep + env.get("PYTHONPATH", ""),
            "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1",
        })
        env.update(self.overrides)
        env.update(extra)
        return env

    def settings(self, **extra) -> Settings:
        env = self.env()
        kw = {k[len("TUNESERVE_"):].lower(): v for k, v in env.items() if k.startswith("TUNESERVE_")}
        kw.update(extra)
        return Settings(**kw)

    def start_worker(self, wait_ready: bool = True, timeout: float = 90, **extra_env: str) -> Worker:
        name = f"w{len(self.workers)}-{secrets.token_hex(3)}"
        log_path = self.data_dir / f"worker-{name}.log"
        proc = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "workers.celery_app", "worker", "-Q", self.queue,
             "--pool=solo", "-c", "1", "--loglevel=INFO", "--without-gossip", "--without-mingle",
             "--without-heartbeat", "-n", f"{name}@%h"],
            cwd=REPO, env=self.env(**extra_env), stdout=open(log_path, "ab"), stderr=subprocess.STDOUT)
        worker = Worker(proc, log_path, name)
        self.workers.append(worker)
        if wait_ready:
            wait_for(lambda: " ready." in worker.log() or not worker.alive(), timeout, f"worker {name} ready")
            assert worker.alive(), worker.log()[-4000:]
        return worker

    def stop_all(self) -> None:
        for worker in self.workers:
            worker.kill(signal.SIGKILL)


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


def dump_worker_logs(world: Env) -> str:
    return "\n".join(f"--- {w.name} ---\n{w.log()[-6000:]}" for w in world.workers)

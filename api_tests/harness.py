"""Test plumbing shared by every test folder: free ports, polling, and dedicated redis-server
processes (never the machine's shared 6379, which fault tests kill and restart), and a
`tuneserve up` process with the children it reports."""
from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx


REPO = Path(__file__).resolve().parents[1]


def process_env(*, data_dir: Path, database_url: str, redis_url: str, queue: str) -> dict[str, str]:
    """Environment for a tuneserve API/worker process started by a test: none of the caller's
    TUNESERVE_* settings leak in, this repo is importable, and nothing reaches a model hub."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TUNESERVE_")}
    env.update({
        "TUNESERVE_DATA_DIR": str(data_dir),
        "TUNESERVE_DATABASE_URL": database_url,
        "TUNESERVE_REDIS_URL": redis_url,
        "TUNESERVE_TASK_QUEUE": queue,
        "TUNESERVE_DEVICE": "cpu",
        "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
        "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1",
    })
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.1,
             diagnostics: Callable[[], str] = lambda: "") -> Any:
    """Poll until predicate() is truthy; generous timeouts instead of sleeps (noisy 2-core hosts)."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}\n{diagnostics()}")
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


def pid_alive(pid: int) -> bool:
    """Running, not a zombie waiting for its (new) parent to reap it."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
    return state not in ("Z", "X")


@dataclass
class Up:
    """One `tuneserve up` process, its log, and the pids it reports for its children."""
    proc: subprocess.Popen
    log_path: Path
    port: int

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @classmethod
    def start(cls, args: list[str], env: dict[str, str], log_path: Path, port: int) -> "Up":
        proc = subprocess.Popen([sys.executable, "-m", "service.cli", "up", *args], cwd=log_path.parent, env=env,
                                stdout=log_path.open("wb"), stderr=subprocess.STDOUT)
        return cls(proc, log_path, port)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def pids(self, name: str) -> list[int]:
        return [int(m) for m in re.findall(rf"(?:started|restarted) {name} \(pid (\d+)\)", self.log())]

    def healthy(self) -> bool:
        try:
            return httpx.get(f"{self.url}/healthz", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    def current(self, name: str) -> int | None:
        """The pid of the child `name` if its latest start is alive (None while it restarts)."""
        pids = self.pids(name)
        return pids[-1] if pids and pid_alive(pids[-1]) else None

    def worker_ready(self, pid: int) -> bool:
        """Celery logged "ready." for this worker process (structured log lines carry the pid)."""
        return re.search(rf' ready\.".*"pid": {pid}\b', self.log()) is not None

    def wait_up(self, what: str, *, workers: int = 1, apis: int = 1, timeout: float = 180) -> None:
        """Each child started at least `workers`/`apis` times, and its latest start alive: the
        API answering, the worker ready."""
        def ready():
            assert self.proc.poll() is None, f"up exited with {self.proc.returncode}\n{self.log()[-6000:]}"
            worker, api = self.current("worker"), self.current("api")
            return (len(self.pids("worker")) >= workers and len(self.pids("api")) >= apis
                    and worker is not None and api is not None and self.worker_ready(worker) and self.healthy())
        wait_for(ready, timeout, what, interval=0.2, diagnostics=lambda: self.log()[-6000:])

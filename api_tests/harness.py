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


class DecodeGate:
    """Paces an inference engine from a test, so that what a client saw before the engine
    produced a later token does not depend on the machine's speed: installed as the runner's
    `decode`, it stops the decode thread before its `hold_at`-th decode step (counted from
    installation; 1 = the first decode after prefill) until `release()`. The hold is bounded
    (`timeout`), so a test that never releases fails instead of hanging the engine.

        gate = DecodeGate(engine._runner, hold_at=3)
        monkeypatch.setattr(engine._runner, "decode", gate)
        ... gate.wait_held(60); check what the client has now; gate.release()
    """

    def __init__(self, runner, hold_at: int = 1, timeout: float = 120.0):
        import threading

        self._decode = runner.decode
        self.hold_at = hold_at
        self.timeout = timeout
        self.calls = 0
        self.held = threading.Event()
        self._go = threading.Event()
        self.hold_timed_out = False

    def __call__(self, *args, **kwargs):
        self.calls += 1
        if self.calls == self.hold_at:
            self.held.set()
            self.hold_timed_out = not self._go.wait(self.timeout)
        return self._decode(*args, **kwargs)

    def wait_held(self, timeout: float) -> None:
        """Until the decode thread is parked in the gate (the steps before it have been delivered)."""
        if not self.held.wait(timeout):
            raise AssertionError(f"the engine never reached decode step {self.hold_at} "
                                 f"({self.calls} steps in {timeout:.0f} s): the reply ended too early to pace")

    def release(self) -> None:
        self._go.set()


def age_heartbeats(store, seconds: float, *job_ids: str) -> None:
    """Move the heartbeats of these jobs (all, if none given) `seconds` into the past: a stale
    heartbeat made deterministically, unlike sleeping past a short timeout on a busy machine
    (where a job meant to stay fresh can go stale too)."""
    from datetime import timedelta

    import sqlalchemy as sa

    from service.core.store import JobRow, utcnow

    stmt = sa.update(JobRow).where(JobRow.heartbeat_at.is_not(None))
    if job_ids:
        stmt = stmt.where(JobRow.id.in_(job_ids))
    with store._write() as s:
        s.execute(stmt.values(heartbeat_at=utcnow() - timedelta(seconds=seconds)))


class DecodeStepper:
    """Runs an inference engine's decode thread only for the steps the test grants (or freely
    once `open()`), so "a request joins while others are decoding" happens by construction,
    not because a sleep was long enough on this machine. Install it as the runner's `decode`
    (`with DecodeStepper(runner) as stepper:` does and undoes that). Each wait is bounded."""

    def __init__(self, runner, timeout: float = 120.0):
        import threading

        self.runner = runner
        self._decode = runner.decode
        self.timeout = timeout
        self.steps = 0  # decode steps run so far
        self.timed_out = False
        self._granted = 0
        self._open = False
        self._cond = threading.Condition()

    def __enter__(self) -> "DecodeStepper":
        self._had_attr = "decode" in vars(self.runner)
        self.runner.decode = self
        return self

    def __exit__(self, *exc) -> None:
        self.open()
        if self._had_attr:
            self.runner.decode = self._decode
        else:
            del self.runner.decode

    def __call__(self, *args, **kwargs):
        with self._cond:
            if not self._cond.wait_for(lambda: self._open or self._granted > 0, self.timeout):
                self.timed_out = True  # run on rather than hang the engine; the test fails on it
            elif not self._open:
                self._granted -= 1
        try:
            return self._decode(*args, **kwargs)
        finally:
            with self._cond:
                self.steps += 1
                self._cond.notify_all()

    def grant(self, n: int) -> int:
        """Allow n more steps; returns the step count to wait for (see `ran`)."""
        with self._cond:
            self._granted += n
            self._cond.notify_all()
            return self.steps + self._granted

    def ran(self, target: int) -> bool:
        return self.steps >= target

    def open(self) -> None:
        with self._cond:
            self._open = True
            self._cond.notify_all()


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
    # `up` has its children log to files under <data dir>/logs/ (its own output keeps their
    # pids and one line per job transition).
    logs_dir: Path | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @classmethod
    def start(cls, args: list[str], env: dict[str, str], log_path: Path, port: int) -> "Up":
        proc = subprocess.Popen([sys.executable, "-m", "service.cli", "up", *args], cwd=log_path.parent, env=env,
                                stdout=log_path.open("wb"), stderr=subprocess.STDOUT)
        data_dir = Path(env.get("TUNESERVE_DATA_DIR") or log_path.parent / ".tuneserve")
        if not data_dir.is_absolute():
            data_dir = log_path.parent / data_dir
        return cls(proc, log_path, port, data_dir / "logs")

    def child_log(self, name: str) -> str:
        """What child `name` (api, worker) logged (JSON lines, every process of that name)."""
        path = self.logs_dir / f"{name}.log" if self.logs_dir else None
        return path.read_text(errors="replace") if path and path.is_file() else ""

    def stop(self) -> None:
        """Ctrl-C's path (SIGTERM), then SIGKILL if it does not end within a minute."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)

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
        return re.search(rf' ready\.".*"pid": {pid}\b', self.child_log("worker")) is not None

    def wait_up(self, what: str, *, workers: int = 1, apis: int = 1, timeout: float = 180) -> None:
        """Each child started at least `workers`/`apis` times, and its latest start alive: the
        API answering, the worker ready."""
        def ready():
            assert self.proc.poll() is None, f"up exited with {self.proc.returncode}\n{self.log()[-6000:]}"
            worker, api = self.current("worker"), self.current("api")
            return (len(self.pids("worker")) >= workers and len(self.pids("api")) >= apis
                    and worker is not None and api is not None and self.worker_ready(worker) and self.healthy())
        wait_for(ready, timeout, what, interval=0.2, diagnostics=lambda: self.log()[-6000:])

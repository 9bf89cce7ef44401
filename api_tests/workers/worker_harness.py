"""Harness for the worker tests (api_tests/workers): dedicated `redis-server` processes on
free ports (never the machine's shared 6379, which these tests kill and restart), real Celery
worker processes (`python -m celery -A workers.celery_app worker --pool=solo`) configured only
through TUNESERVE_* variables, a SQLite store in the test's tmp dir shared with the workers,
and job helpers."""
from __future__ import annotations

import json
import secrets
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from service.core.config import Settings
from service.core.datasets import validate_file
from service.core.domain import Job, JobStatus, TrainingSpec
from service.core.store import Store

from harness import REPO, RedisServer, free_port, process_env, wait_for  # noqa: F401  (re-exported for the worker tests)

FIXTURE_MODEL = REPO / "api_tests" / "fixtures" / "chatglm3-tiny"
SAMPLE = REPO / "service" / "data" / "advertisegen_sample.jsonl"
SAMPLE_VAL = REPO / "service" / "data" / "advertisegen_sample_val.jsonl"


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
        env = process_env(data_dir=self.data_dir, database_url=self.db_url, redis_url=self.redis_url,
                          queue=self.queue)
        env.update({
            "TUNESERVE_HEARTBEAT_INTERVAL_S": "0.5",
            "TUNESERVE_HEARTBEAT_TIMEOUT_S": "5",
            "TUNESERVE_REAPER_INTERVAL_S": "1",
            "TUNESERVE_REQUEUE_GRACE_S": "2",
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
        # SIGKILL is fine here: every test has its own redis-server, so kombu's global keys (the
        # unacked hash, the restore mutex a worker killed mid-sweep would leave) die with it.
        for worker in self.workers:
            worker.kill(signal.SIGKILL)


def broker_state(redis_url: str, queue: str) -> str:
    import redis

    try:
        r = redis.Redis.from_url(redis_url, socket_connect_timeout=1)
        return (f"broker: llen({queue})={r.llen(queue)} unacked={r.hlen('unacked')} "
                f"unacked_index={r.zrange('unacked_index', 0, -1, withscores=True)} "
                f"unacked_mutex ttl={r.ttl('unacked_mutex')} now={time.time():.1f}")
    except Exception as exc:
        return f"broker: unreachable ({exc})"


def dump_worker_logs(world: Env) -> str:
    return broker_state(world.redis_url, world.queue) + "\n" + _worker_logs(world)


def _worker_logs(world: Env) -> str:
    return "\n".join(f"--- {w.name} ---\n{w.log()[-8000:]}" for w in world.workers)


# ---------------------------------------------------------------------------------------
# Jobs
# ---------------------------------------------------------------------------------------
TENANT = "acme"


def training_file(store: Store, data_dir: Path, rows: int, *, source: Path = SAMPLE, name: str = "train.jsonl") -> str:
    lines = [ln for ln in source.read_text(encoding="utf-8").splitlines() if ln.strip()][:rows]
    path = data_dir / "files" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    fmt, n = validate_file(path, max_bytes=1 << 24, max_rows=10_000, max_line_bytes=1 << 20, max_depth=8)
    return store.create_file(tenant=TENANT, filename=name, purpose="fine-tune", bytes=path.stat().st_size,
                             rows=n, format=fmt, sha256="0" * 64, path=path).id


def validation_file(store: Store, data_dir: Path, rows: int) -> str:
    return training_file(store, data_dir, rows, source=SAMPLE_VAL, name="val.jsonl")


def tiny_spec(**overrides) -> TrainingSpec:
    """Seconds per job on the tiny fixture, in 4-bit (NF4 + double quant, the QLoRA path)."""
    base = dict(max_steps=8, batch_size=4, learning_rate=5e-3, lr_scheduler="constant",
                checkpoint_steps=4, logging_steps=1, max_source_length=48, max_target_length=48,
                eval_max_samples=1, eval_max_new_tokens=4, load_in_4bit=True, seed=7)
    base.update(overrides)
    return TrainingSpec(**base)


def create_job(store: Store, train_id: str, spec: TrainingSpec, *, validation_id: str | None = None,
               suffix: str | None = None) -> Job:
    return store.create_job(tenant=TENANT, model=str(FIXTURE_MODEL), spec=spec, training_file=train_id,
                            validation_file=validation_id, suffix=suffix)


def wait_status(store: Store, job_id: str, statuses, timeout: float, worker_logs=lambda: "") -> Job:
    wanted = {JobStatus(s) for s in statuses}
    deadline = time.monotonic() + timeout
    while True:
        job = store.get_job(job_id)
        if job.status in wanted:
            return job
        if job.status.is_final or time.monotonic() > deadline:
            events = "\n".join(f"  {e.level} {e.message} {json.dumps(e.data) if e.data else ''}"
                               for e in store.all_events(job_id))
            raise AssertionError(f"job {job_id} is {job.status.value} (error={job.error}, attempts={job.attempts}), "
                                 f"wanted {sorted(s.value for s in wanted)}\nevents:\n{events}\n{worker_logs()}")
        time.sleep(0.1)


def loss_points(store: Store, job_id: str) -> list[tuple[int, float, int | None]]:
    """(step, loss, run attempt) of every per-step training-loss event, in order."""
    out = []
    attempt = None
    for ev in store.all_events(job_id):
        data = ev.data or {}
        if "attempt" in data and "worker_id" in data:
            attempt = data["attempt"]
        if ev.type == "metrics" and "loss" in data and "step" in data and "total_steps" in data:
            out.append((int(data["step"]), float(data["loss"]), attempt))
    return out

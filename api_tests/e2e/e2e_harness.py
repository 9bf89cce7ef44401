"""Whole-system harness: the service as it runs in production, as processes.

* the API: `python -m service.cli api --port N` (uvicorn serving create_app(), the inference
  engine on with a tiny ChatGLM3-format demo model built by build_demo_model, loaded in 4-bit
  NF4 on CPU);
* training workers: `python -m service.cli worker` (execs Celery, queue from
  TUNESERVE_TASK_QUEUE, with the reaper thread);
* Redis: the machine's 127.0.0.1:6379 with a per-run queue name and database number, or a
  dedicated redis-server (worker_harness.RedisServer) for tests that kill it;
* SQLite + registry + uploads under one tmp data dir, shared by API and workers.

Every setting reaches the processes only through TUNESERVE_* variables, as in a deployment.
"""
from __future__ import annotations

import json
import secrets
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from harness import REPO, RedisServer, free_port, process_env, wait_for  # noqa: E402

SAMPLE = REPO / "service" / "data" / "advertisegen_sample.jsonl"
SAMPLE_VAL = REPO / "service" / "data" / "advertisegen_sample_val.jsonl"
SHARED_REDIS = "redis://127.0.0.1:6379"

KEY_A = "e2e-key-alice-" + "a" * 24
KEY_B = "e2e-key-bob-" + "b" * 24
AUTH_A = {"Authorization": f"Bearer {KEY_A}"}
AUTH_B = {"Authorization": f"Bearer {KEY_B}"}

FINAL = {"succeeded", "failed", "cancelled"}

__all__ = ["RedisServer", "free_port", "System", "Proc", "Client", "wait_for", "sample_rows", "jsonl_bytes",
           "shared_redis_db", "cleanup_broker", "loss_curve", "iter_sse", "AUTH_A", "AUTH_B", "KEY_A", "KEY_B"]


def sample_rows(n: int, source: Path = SAMPLE) -> list[dict]:
    rows = [json.loads(line) for line in source.read_text(encoding="utf-8").splitlines() if line.strip()]
    return rows[:n]


def jsonl_bytes(rows: list[dict]) -> bytes:
    return b"".join(json.dumps(r, ensure_ascii=False).encode() + b"\n" for r in rows)


def shared_redis_db() -> int:
    """A database number on the shared Redis for this run: a per-run queue name keeps runs apart
    anyway; a separate db also keeps kombu's global `unacked` hash and restore mutex away from
    other suites that kill workers on db 0."""
    return 1 + secrets.randbelow(15)


def cleanup_broker(redis_url: str, queue: str) -> None:
    """Remove what kombu kept on a shared Redis for this run's queue: the queue lists, its
    bindings, and unacked messages routed to it (a SIGKILLed worker leaves one behind)."""
    import redis

    r = redis.Redis.from_url(redis_url, socket_connect_timeout=2)
    try:
        r.delete(queue, *(f"{queue}\x06\x16{p}" for p in (3, 6, 9)),
                 f"_kombu.binding.{queue}", f"_kombu.binding_permanent.{queue}")
        for tag, raw in r.hgetall("unacked").items():
            try:
                routing_key = json.loads(raw)[2]
            except Exception:
                continue
            if routing_key == queue:
                r.hdel("unacked", tag)
                r.zrem("unacked_index", tag)
        # A worker's remote-control binding is all that is left in a database nobody else uses.
        leftovers = {k.decode() for k in r.keys("*")}
        if leftovers and leftovers <= {"_kombu.binding.celery.pidbox", "_kombu.binding_deadlines"}:
            r.delete(*leftovers)
    finally:
        r.close()


@dataclass
class Proc:
    name: str
    proc: subprocess.Popen
    log_path: Path
    port: int | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int | None:
        if self.alive():
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        return self.proc.returncode


@dataclass
class System:
    """One deployment: a data dir, a broker URL, a queue, an API key per tenant, a base model."""
    root: Path
    redis_url: str
    base_model: Path
    queue: str = field(default_factory=lambda: f"e2e-training-{secrets.token_hex(4)}")
    overrides: dict[str, str] = field(default_factory=dict)
    procs: list[Proc] = field(default_factory=list)

    @property
    def data_dir(self) -> Path:
        return self.root / "data"

    @property
    def db_url(self) -> str:
        return f"sqlite:///{self.data_dir / 'tuneserve.db'}"

    @property
    def registry_dir(self) -> Path:
        return self.data_dir / "adapters"

    def env(self, **extra: str) -> dict[str, str]:
        env = process_env(data_dir=self.data_dir, database_url=self.db_url, redis_url=self.redis_url,
                          queue=self.queue)
        env.update({
            "TUNESERVE_BASE_MODEL": str(self.base_model),
            "TUNESERVE_API_KEYS": f"{KEY_A}:alice,{KEY_B}:bob",
            "TUNESERVE_LOAD_IN_4BIT": "true",
            # A small engine: the tiny model needs little KV cache and batch.
            "TUNESERVE_MAX_BATCH_SIZE": "4",
            "TUNESERVE_MAX_SEQ_LEN": "256",
            "TUNESERVE_ADAPTER_GPU_BUDGET_BYTES": str(8 << 20),
            # Supervision fast enough for a test, lenient enough for a loaded 2-core host: a
            # SIGKILLed local worker is detected by its pid, not by the heartbeat timeout.
            "TUNESERVE_HEARTBEAT_INTERVAL_S": "0.5",
            "TUNESERVE_HEARTBEAT_TIMEOUT_S": "60",
            "TUNESERVE_REAPER_INTERVAL_S": "1",
            "TUNESERVE_REQUEUE_GRACE_S": "3",
            "CUDA_VISIBLE_DEVICES": "",
            # Two processes share two cores: one torch thread each avoids oversubscription.
            "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
        })
        env.update(self.overrides)
        env.update(extra)
        return env

    # --- processes ------------------------------------------------------------------------
    def _spawn(self, name: str, argv: list[str], port: int | None, env: dict[str, str]) -> Proc:
        self.root.mkdir(parents=True, exist_ok=True)
        log_path = self.root / f"{name}.log"
        proc = subprocess.Popen(argv, cwd=self.root, env=env, stdout=open(log_path, "ab"),
                                stderr=subprocess.STDOUT, start_new_session=True)
        p = Proc(name, proc, log_path, port)
        self.procs.append(p)
        return p

    def start_api(self, port: int | None = None, *, wait: bool = True, timeout: float = 240,
                  **extra_env: str) -> Proc:
        port = port or free_port()
        n = sum(p.name.startswith("api") for p in self.procs)
        api = self._spawn(f"api{n}", [sys.executable, "-m", "service.cli", "api", "--port", str(port)], port,
                          self.env(**extra_env))
        if wait:
            self.wait_ready(api, timeout)
        return api

    def wait_ready(self, api: Proc, timeout: float = 240) -> dict:
        def ready():
            if not api.alive():
                raise AssertionError(f"{api.name} exited with {api.proc.returncode}:\n{api.log()[-6000:]}")
            try:
                r = httpx.get(f"{api.url}/readyz", timeout=5)
            except httpx.HTTPError:
                return None
            body = r.json()
            if body.get("checks", {}).get("engine") == "failed":
                raise AssertionError(f"engine failed to start: {body}\n{api.log()[-6000:]}")
            return body if r.status_code == 200 else None
        return wait_for(ready, timeout, f"{api.name} ready", interval=0.3, diagnostics=lambda: api.log()[-6000:])

    def start_worker(self, *, wait: bool = True, timeout: float = 120, **extra_env: str) -> Proc:
        n = sum(p.name.startswith("worker") for p in self.procs)
        worker = self._spawn(f"worker{n}", [sys.executable, "-m", "service.cli", "worker"], None,
                             self.env(**extra_env))
        if wait:
            wait_for(lambda: " ready." in worker.log() or not worker.alive(), timeout, f"{worker.name} ready",
                     diagnostics=lambda: worker.log()[-4000:])
            assert worker.alive(), worker.log()[-4000:]
        return worker

    def stop_all(self) -> None:
        for p in reversed(self.procs):
            p.stop(signal.SIGKILL if p.name.startswith("worker") else signal.SIGTERM, timeout=20)

    def logs(self) -> str:
        return "\n".join(f"--- {p.name} (rc={p.proc.poll()}) ---\n{p.log()[-5000:]}" for p in self.procs)

    # --- direct looks at what is on disk / in the store (for "nothing written" checks) ------
    def store(self):
        from service.core.store import Store
        return Store(self.db_url)

    def files_on_disk(self) -> list[Path]:
        d = self.data_dir / "files"
        return sorted(d.rglob("*")) if d.exists() else []

    def registry_entries(self) -> list[Path]:
        return sorted(self.registry_dir.rglob("*")) if self.registry_dir.exists() else []

    def tmp_leftovers(self) -> list[Path]:
        """Temp dirs/files anywhere in the data dir (registry `.tmp-*`, uploads, adapter tmp)."""
        return [p for p in self.data_dir.rglob("*") if ".tmp" in p.name or p.name.startswith("tmp")]


class Client:
    """A thin httpx client for one API process and one tenant."""

    def __init__(self, base_url: str, headers: dict[str, str] = AUTH_A, timeout: float = 120):
        self.base = base_url
        self.http = httpx.Client(base_url=base_url, headers=headers, timeout=timeout)

    def close(self) -> None:
        self.http.close()

    def upload(self, data: bytes, filename: str = "train.jsonl") -> dict:
        r = self.http.post("/v1/files", files={"file": (filename, data, "application/jsonl")},
                           data={"purpose": "fine-tune"})
        assert r.status_code == 200, r.text
        return r.json()

    def create_job(self, **body) -> dict:
        r = self.http.post("/v1/fine_tuning/jobs", json=body)
        assert r.status_code == 200, r.text
        return r.json()

    def job(self, job_id: str) -> dict:
        r = self.http.get(f"/v1/fine_tuning/jobs/{job_id}")
        assert r.status_code == 200, r.text
        return r.json()

    def events(self, job_id: str) -> list[dict]:
        """Every event, oldest first (the API pages newest first)."""
        out: list[dict] = []
        after = None
        while True:
            params: dict[str, Any] = {"limit": 1000}
            if after:
                params["after"] = after
            r = self.http.get(f"/v1/fine_tuning/jobs/{job_id}/events", params=params)
            assert r.status_code == 200, r.text
            page = r.json()
            out += page["data"]
            if not page["has_more"] or not page["data"]:
                break
            after = page["data"][-1]["id"]
        # Pages come newest first in insertion order; created_at has one-second resolution.
        return out[::-1]

    def wait_job(self, job_id: str, statuses: set[str], timeout: float, diagnostics=lambda: "") -> dict:
        def check():
            job = self.job(job_id)
            if job["status"] in statuses:
                return job
            if job["status"] in FINAL:
                raise AssertionError(f"{job_id} ended {job['status']} (error={job.get('error')}), wanted "
                                     f"{sorted(statuses)}\n{self._event_dump(job_id)}\n{diagnostics()}")
            return None
        return wait_for(check, timeout, f"{job_id} to reach {sorted(statuses)}", interval=0.5,
                        diagnostics=lambda: f"{self.job(job_id)}\n{self._event_dump(job_id)}\n{diagnostics()}")

    def _event_dump(self, job_id: str) -> str:
        try:
            return "\n".join(f"  {e['level']} {e['message']}" for e in self.events(job_id))
        except Exception as exc:  # diagnostics only
            return f"(events unavailable: {exc})"

    def chat(self, model: str, content: str, max_tokens: int = 16) -> str:
        r = self.http.post("/v1/chat/completions", json={
            "model": model, "messages": [{"role": "user", "content": content}],
            "max_tokens": max_tokens, "temperature": 0})
        assert r.status_code == 200, r.text
        return r.json()["choices"][0]["message"]["content"]


def loss_curve(events: list[dict]) -> list[tuple[int, float]]:
    """(step, training loss) of the per-step metrics events, oldest first, last run wins."""
    points: dict[int, float] = {}
    for ev in events:
        data = ev.get("data") or {}
        if ev.get("type") == "metrics" and "loss" in data and "total_steps" in data:
            points[int(data["step"])] = float(data["loss"])
    return sorted(points.items())


def iter_sse(response: httpx.Response) -> Iterator[dict | str]:
    """Parsed `data:` payloads of an SSE response ("[DONE]" as a string)."""
    for line in response.iter_lines():
        if line.startswith("data: "):
            payload = line[len("data: "):]
            yield payload if payload == "[DONE]" else json.loads(payload)

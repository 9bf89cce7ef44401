"""Supervision of training jobs: "a job is never stuck `running` with no live worker, and no
`queued` job is lost when the broker loses its messages". The store is the truth.

One `Reaper.run_once()` sweep:
  (a) `running` jobs whose owner is gone — heartbeat older than `heartbeat_timeout_s`, or the
      owner was a process on this host that no longer exists — are requeued
      (running -> queued, compare-and-set, then the task is sent again; the training resumes
      from the job's last checkpoint), or failed with `worker_lost` once they have used
      `job_max_attempts` runs.
  (b) `queued` jobs that are neither waiting in the broker queue nor held (unacked) by a
      worker for `requeue_grace_s` — Redis restarted empty, or a worker died between taking the
      message and claiming the job — are sent again.

Where it runs: a daemon thread in every worker process, started on Celery's `worker_ready`
signal (workers/celery_app.py) — no extra process to deploy, it runs wherever training can
run, and with the solo pool it keeps sweeping while the main thread trains. Several workers
sweeping at once is safe: requeueing is a compare-and-set in the store, a re-send takes a
short per-job Redis lock, and a duplicate delivery is dropped by the task's own claim. This
module imports neither torch nor the training code, so the API process could run a sweep too.
"""
from __future__ import annotations

import base64
import json
import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime, timezone

from service.core.config import Settings
from service.core.domain import Job, JobError, JobErrorCode, JobStatus
from service.core.errors import Conflict, NotFound
from service.core.tasks import TRAIN_TASK

log = logging.getLogger("tuneserve.reaper")

# kombu's redis transport: queue `q` at priority p > 0 lives in the list `q + SEP + str(p)`.
_KOMBU_SEP = "\x06\x16"
_KOMBU_PRIORITIES = (3, 6, 9)
_KOMBU_UNACKED = "unacked"
_KOMBU_UNACKED_INDEX = "unacked_index"


# ---------------------------------------------------------------------------------------
# Who owns a running job, and is it alive?
# ---------------------------------------------------------------------------------------
def worker_identity() -> str:
    """`<host>:<pid>` of this process, stored as the job's worker_id while it trains."""
    return f"{socket.gethostname()}:{os.getpid()}"


def _local_owner_dead(worker_id: str | None) -> bool:
    """True only when the owner is a process of THIS host that no longer exists (a SIGKILLed
    worker restarted on the same machine). Unknown or remote owners are judged by heartbeat."""
    if not worker_id:
        return False
    host, _, pid = worker_id.rpartition(":")
    if host != socket.gethostname() or not pid.isdigit():
        return False
    pid_i = int(pid)
    if pid_i == os.getpid():
        return False
    try:
        os.kill(pid_i, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # exists, owned by someone else
        return False
    # A zombie (killed, not yet reaped by its parent) still answers kill(0).
    try:
        with open(f"/proc/{pid_i}/stat", "rb") as fh:
            return fh.read().rsplit(b")", 1)[1].split()[0] == b"Z"
    except (OSError, IndexError):
        return False


def heartbeat_age_s(job: Job, now: datetime | None = None) -> float | None:
    if job.heartbeat_at is None:
        return None
    now = now or datetime.now(timezone.utc)
    return (now - job.heartbeat_at).total_seconds()


def owner_alive(job: Job, settings: Settings) -> bool:
    """Is the worker recorded on this running job still working on it?"""
    if job.status is not JobStatus.running:
        return False
    if _local_owner_dead(job.worker_id):
        return False
    age = heartbeat_age_s(job)
    return age is not None and age <= settings.heartbeat_timeout_s


def worker_lost_error(job: Job) -> JobError:
    return JobError(code=JobErrorCode.worker_lost.value,
                    message=(f"the worker running this job was lost (last: {job.worker_id or 'unknown'}) "
                             f"and the job already used {job.attempts} of its runs; giving up"))


# ---------------------------------------------------------------------------------------
# What the broker holds
# ---------------------------------------------------------------------------------------
def _job_id_of(raw: bytes | str) -> str | None:
    """The job id a kombu redis message carries (train(job_id) by name), or None."""
    try:
        msg = json.loads(raw)
        headers = msg.get("headers") or {}
        if headers.get("task") != TRAIN_TASK:
            return None
        body = msg.get("body")
        if (msg.get("properties") or {}).get("body_encoding") == "base64":
            body = base64.b64decode(body)
        args = json.loads(body)[0]
        return str(args[0]) if args else None
    except Exception:  # a foreign or malformed message: not ours
        return None


class RedisQueueProbe:
    """Reads kombu's redis layout: the queue lists and the unacked hash (messages a worker took
    and has not acknowledged, with the time it took them in `unacked_index`)."""

    def __init__(self, redis_url: str, queue: str):
        import redis

        self.queue = queue
        self._client = redis.Redis.from_url(redis_url, socket_connect_timeout=2.0, socket_timeout=5.0)

    def close(self) -> None:
        self._client.close()

    def job_ids(self, unacked_max_age_s: float | None = None) -> set[str]:
        """Job ids waiting in the queue, plus those held unacked for less than
        `unacked_max_age_s` (all of them when None). Raises on a broker error."""
        found: set[str] = set()
        for key in [self.queue, *(f"{self.queue}{_KOMBU_SEP}{p}" for p in _KOMBU_PRIORITIES)]:
            for raw in self._client.lrange(key, 0, -1):
                if (jid := _job_id_of(raw)) is not None:
                    found.add(jid)
        now = time.time()
        for tag, raw in self._client.hgetall(_KOMBU_UNACKED).items():
            try:
                message, _exchange, routing_key = json.loads(raw)
            except Exception:
                continue
            if routing_key != self.queue:
                continue
            if unacked_max_age_s is not None:
                taken = self._client.zscore(_KOMBU_UNACKED_INDEX, tag)
                if taken is not None and now - float(taken) > unacked_max_age_s:
                    continue  # taken long ago and never claimed: its worker is gone
            if (jid := _job_id_of(json.dumps(message))) is not None:
                found.add(jid)
        return found

    def try_lock(self, key: str, ttl_s: float) -> bool:
        return bool(self._client.set(key, worker_identity(), nx=True, px=max(1, int(ttl_s * 1000))))


# ---------------------------------------------------------------------------------------
# The sweep
# ---------------------------------------------------------------------------------------
@dataclass
class ReapReport:
    requeued: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    cancelled: list[str] = field(default_factory=list)
    resent: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


class Reaper:
    """`send(job_id)` puts train(job_id) on the broker; `probe` reads the broker (None: skip (b))."""

    def __init__(self, store, settings: Settings, send: Callable[[str], None],
                 probe: RedisQueueProbe | None = None, *, clock: Callable[[], float] = time.monotonic):
        self.store = store
        self.settings = settings
        self.send = send
        self.probe = probe
        self.clock = clock
        self._absent_since: dict[str, float] = {}

    def run_once(self) -> ReapReport:
        report = ReapReport()
        self._reap_running(report)
        if self.probe is not None:
            self._resend_lost_queued(report)
        for kind in ("requeued", "failed", "cancelled", "resent"):
            for jid in getattr(report, kind):
                log.info("reaper: %s %s", kind, jid)
        return report

    # (a) ------------------------------------------------------------------------------
    def _stale_running(self) -> Iterable[Job]:
        stale = {j.id: j for j in self.store.stale_running_jobs(self.settings.heartbeat_timeout_s)}
        for job in self.store.jobs_with_status([JobStatus.running]):
            if job.id not in stale and _local_owner_dead(job.worker_id):
                stale[job.id] = job
        return stale.values()

    def _reap_running(self, report: ReapReport) -> None:
        for job in self._stale_running():
            age = heartbeat_age_s(job)
            why = (f"worker {job.worker_id or 'unknown'} stopped heartbeating"
                   + (f" {age:.0f} s ago" if age is not None else ""))
            try:
                if job.cancel_requested:
                    self.store.transition(job.id, JobStatus.cancelled)
                    self.store.add_event(job.id, f"{why}; the job was being cancelled: cancelled")
                    report.cancelled.append(job.id)
                elif job.attempts >= self.settings.job_max_attempts:
                    self.store.transition(job.id, JobStatus.failed, error=worker_lost_error(job))
                    self.store.add_event(job.id, f"{why}; {job.attempts} runs used: failed (worker_lost)",
                                         level="error")
                    report.failed.append(job.id)
                else:
                    self.store.transition(job.id, JobStatus.queued)
                    self.store.add_event(job.id, f"{why}; requeued, the next run resumes from the last "
                                                 "checkpoint", level="warn")
                    report.requeued.append(job.id)
                    self._send(job.id, report)
            except (Conflict, NotFound):
                continue  # another reaper, a redelivery or the owner itself got there first

    # (b) ------------------------------------------------------------------------------
    def _resend_lost_queued(self, report: ReapReport) -> None:
        queued = self.store.job_ids_with_status([JobStatus.queued])
        now = self.clock()
        live = set(queued)
        for gone in list(self._absent_since):
            if gone not in live:
                del self._absent_since[gone]
        if not queued:
            return
        grace = self.settings.requeue_grace_s
        try:
            in_broker = self.probe.job_ids(unacked_max_age_s=grace)
        except Exception as exc:  # broker down: nothing can be re-sent now anyway
            report.errors.append(f"broker unreachable: {exc}")
            return
        for jid in queued:
            if jid in in_broker or jid in report.requeued:
                self._absent_since.pop(jid, None)
                continue
            first = self._absent_since.setdefault(jid, now)
            if now - first < grace:
                continue  # just created / just requeued: its message may be on its way
            try:
                if not self.probe.try_lock(f"tuneserve:resend:{jid}", grace):
                    continue  # another worker's reaper re-sends it
            except Exception as exc:
                report.errors.append(f"broker unreachable: {exc}")
                return
            self.store.add_event(jid, "the broker lost this queued job; sent again", level="warn")
            self._send(jid, report)
            report.resent.append(jid)
            self._absent_since.pop(jid, None)

    def _send(self, job_id: str, report: ReapReport) -> None:
        try:
            self.send(job_id)
        except Exception as exc:  # left queued in the store: sweep (b) re-sends it later
            report.errors.append(f"send {job_id}: {exc}")
            log.warning("reaper could not send %s: %s", job_id, exc)


class ReaperThread(threading.Thread):
    """Runs `Reaper.run_once()` every `reaper_interval_s` inside a worker process."""

    def __init__(self, app, settings: Settings):
        super().__init__(name="tuneserve-reaper", daemon=True)
        self.app = app
        self.settings = settings
        self._stop_event = threading.Event()

    def stop(self) -> None:
        self._stop_event.set()

    def run(self) -> None:
        from service.core.store import Store
        from workers.celery_app import send_train

        store = probe = None
        while not self._stop_event.is_set():
            try:
                if store is None:
                    store = Store(self.settings.resolved_database_url)
                    probe = RedisQueueProbe(self.settings.redis_url, self.settings.task_queue)
                    reaper = Reaper(store, self.settings, lambda jid: send_train(self.app, self.settings, jid),
                                    probe)
                report = reaper.run_once()
                for err in report.errors:
                    log.warning("reaper: %s", err)
            except Exception:  # the database or broker may be briefly away: try again next time
                log.exception("reaper sweep failed")
            self._stop_event.wait(self.settings.reaper_interval_s)
        if probe is not None:
            probe.close()
        if store is not None:
            store.close()

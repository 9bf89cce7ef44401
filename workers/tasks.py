"""The one Celery task: `tuneserve.train(job_id)`.

The message carries only the job id; everything else is read from the store, which is the
truth. A delivery may be a first run, a redelivery after a dead worker (Redis visibility
timeout, prefork reject-on-worker-lost, or the reaper's requeue), or a harmless duplicate.
`claim_job` sorts them out with the store's compare-and-set transitions:

  final                                    -> nothing to do (idempotent redelivery)
  running, owner alive                     -> duplicate delivery: return quietly
  cancel requested                         -> cancelled
  running, owner dead, runs left           -> running -> queued -> running (this worker);
                                              the training resumes from work_dir's checkpoint
  running, owner dead, no runs left        -> failed (worker_lost)
  queued                                   -> running (this worker)

Losing any compare-and-set race means another delivery got there first: re-read and decide
again. While training, a heartbeat thread refreshes the job's heartbeat and checks that this
run still owns the job (its `attempts` number is the fencing token); the training loop asks
`should_stop()` every step.
"""
from __future__ import annotations

import logging
import shutil
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from celery import shared_task

from service.core.config import Settings, get_settings
from service.core.domain import (
    FINAL_STATES,
    Job,
    JobError,
    JobErrorCode,
    JobProgress,
    JobStatus,
    adapter_name_for_job,
)
from service.core.errors import Cancelled, Conflict, InvalidInput, NotFound, TrainingError
from service.core.identity import load_ref, public_id
from service.core.results import discard_results_file, write_results_file
from service.core.tasks import TRAIN_TASK
from workers.reaper import owner_alive, worker_identity, worker_lost_error

if TYPE_CHECKING:  # the training core imports torch; the task loads it only to train
    from workers.training import TrainingOutcome

log = logging.getLogger("tuneserve.worker")

# Event types the store accepts: numbers for the loss curve are "metrics", the rest "message".
_METRIC_KEYS = frozenset({"loss", "eval_loss", "step"})


# ---------------------------------------------------------------------------------------
# Claiming a job
# ---------------------------------------------------------------------------------------
def claim_job(store, job_id: str, worker_id: str, settings: Settings) -> Job | None:
    """Make this worker the job's runner (status running, attempts += 1), or return None when
    there is nothing for this delivery to do."""
    for _ in range(20):
        try:
            job = store.get_job(job_id)
        except NotFound:
            log.warning("train(%s): no such job; dropping the message", job_id)
            return None
        try:
            if job.status in FINAL_STATES:
                log.info("train(%s): already %s; nothing to do", job_id, job.status.value)
                return None
            if job.status is JobStatus.running and owner_alive(job, settings):
                log.info("train(%s): running on live worker %s; duplicate delivery dropped",
                         job_id, job.worker_id)
                return None
            if job.cancel_requested:
                store.transition(job_id, JobStatus.cancelled)
                store.add_event(job_id, "cancelled before it (re)started")
                return None
            if job.status is JobStatus.running:  # its worker is gone: this is the redelivery
                if job.attempts >= settings.job_max_attempts:
                    store.transition(job_id, JobStatus.failed, error=worker_lost_error(job))
                    store.add_event(job_id, f"worker {job.worker_id} lost; {job.attempts} runs used: "
                                            "failed (worker_lost)", level="error")
                    return None
                store.transition(job_id, JobStatus.queued)
                store.add_event(job_id, f"worker {job.worker_id} lost; redelivered, resuming from the "
                                        "last checkpoint", level="warn")
                continue
            if job.status is JobStatus.queued:
                return store.transition(job_id, JobStatus.running, worker_id=worker_id)
            log.warning("train(%s): status %s cannot start; dropping the message", job_id, job.status.value)
            return None
        except Conflict:
            time.sleep(0.05)  # someone else moved the job: look again
    log.warning("train(%s): could not claim the job after repeated races; leaving it", job_id)
    return None


# ---------------------------------------------------------------------------------------
# Liveness while training
# ---------------------------------------------------------------------------------------
class Heartbeat(threading.Thread):
    """Refreshes heartbeat_at every `interval` and watches for losing the job: if its status
    is no longer running or its attempts number changed, another run owns it (the reaper
    requeued it while this one was unreachable) and this run must stop without writing."""

    def __init__(self, store, job_id: str, worker_id: str, attempt: int, interval: float):
        super().__init__(name=f"heartbeat-{job_id}", daemon=True)
        self.store, self.job_id, self.worker_id, self.attempt = store, job_id, worker_id, attempt
        self.interval = max(0.05, float(interval))
        self.lost = threading.Event()
        self._stop_event = threading.Event()

    def stop(self) -> None:
        self._stop_event.set()
        if self.is_alive():
            self.join(timeout=5)

    def beat(self) -> None:
        job = self.store.get_job(self.job_id)
        if job.status is not JobStatus.running or job.attempts != self.attempt:
            log.warning("job %s: this run (attempt %d) no longer owns it (%s, attempt %d); stopping",
                        self.job_id, self.attempt, job.status.value, job.attempts)
            self.lost.set()
            return
        self.store.heartbeat(self.job_id, self.worker_id)

    def run(self) -> None:
        while not self._stop_event.wait(self.interval):
            try:
                self.beat()
            except NotFound:
                self.lost.set()
            except Exception:  # a database hiccup: the next beat retries; the reaper is lenient
                log.warning("job %s: heartbeat failed", self.job_id, exc_info=True)
            if self.lost.is_set():
                return


class StoreProgress:
    """The training core's Progress: events and progress go to the store; `should_stop` reads the
    job's cancel flag on every call (one indexed primary-key lookup, well under a millisecond on
    SQLite or PostgreSQL, negligible next to a training step), so a cancel takes effect at the
    next step, and it also stops a run that lost ownership of the job."""

    def __init__(self, store, job_id: str, heartbeat: Heartbeat | None = None):
        self.store, self.job_id, self.heartbeat = store, job_id, heartbeat
        self.cancel_seen = False

    @property
    def lost(self) -> bool:
        return self.heartbeat is not None and self.heartbeat.lost.is_set()

    def event(self, message: str, level: str = "info", data: dict | None = None, **_: Any) -> None:
        if self.lost:
            return
        type_ = "metrics" if data and _METRIC_KEYS & data.keys() else "message"
        level = level if level in ("info", "warn", "error") else ("warn" if level == "warning" else "info")
        self._write(self.store.add_event, self.job_id, message, level=level, type=type_, data=data)

    def progress(self, progress: JobProgress, trained_tokens: int | None = None) -> None:
        if self.lost:
            return
        self._write(self.store.update_progress, self.job_id, progress, trained_tokens=trained_tokens)

    def should_stop(self) -> bool:
        if self.lost:
            return True
        try:
            self.cancel_seen = self.cancel_seen or self.store.is_cancel_requested(self.job_id)
        except NotFound:
            return True
        except Exception:  # the database is briefly away: keep training, ask again next step
            log.warning("job %s: cancel check failed", self.job_id, exc_info=True)
        return self.cancel_seen

    def _write(self, fn, *args, **kwargs) -> None:
        # Telemetry is best effort: one retry, then a lost point in the curve rather than a
        # failed multi-hour run. Final transitions are never written through here.
        for attempt in range(2):
            try:
                fn(*args, **kwargs)
                return
            except NotFound:
                return
            except Exception:
                if attempt:
                    log.warning("job %s: could not record progress", self.job_id, exc_info=True)
                else:
                    time.sleep(0.2)


# ---------------------------------------------------------------------------------------
# Running a claimed job
# ---------------------------------------------------------------------------------------
def _job_error(code: str | JobErrorCode, message: str, param: str | None = None) -> JobError:
    return JobError(code=JobErrorCode(code).value if isinstance(code, JobErrorCode) else str(code),
                    message=message, param=param)


def _classify_unexpected(exc: BaseException) -> JobError:
    name = type(exc).__name__
    if isinstance(exc, MemoryError) or name == "OutOfMemoryError" or "out of memory" in str(exc).lower():
        return _job_error(JobErrorCode.out_of_memory, f"out of memory: {exc}")
    return _job_error(JobErrorCode.internal, f"internal error in the worker ({name}): {exc}")


def load_training_data(store, job: Job, settings: Settings) -> tuple[list, list | None]:
    """(train, validation) conversations from the job's files or `datasets` sources. Local
    sources are resolved against the dataset roots again here, at read time: the API's check
    at creation says nothing about what the path leads to now."""
    from service.core import datasets

    def one(file_id: str | None, source, what: str) -> list | None:
        try:
            if file_id:  # read_conversations validates lazily: materialize inside the try
                return list(datasets.read_conversations(store.get_file(file_id, None).path))
            if source is not None:
                return datasets.load_dataset_source(source, allowed_roots=settings.resolved_dataset_roots,
                                                    param=what.replace("_file", "_dataset"))
        except NotFound as exc:
            raise TrainingError(f"{what} {file_id} no longer exists", code="invalid_data",
                                param=f"{what}") from exc
        except InvalidInput as exc:
            raise TrainingError(f"{what}: {exc.message}", code="invalid_data", param=exc.param or what) from exc
        except (OSError, ValueError) as exc:
            raise TrainingError(f"{what}: cannot read the data: {exc}", code="invalid_data", param=what) from exc
        return None

    train = one(job.training_file, job.training_dataset, "training_file")
    if not train:
        raise TrainingError("the job has no training data", code="invalid_data", param="training_file")
    return train, one(job.validation_file, job.validation_dataset, "validation_file")


def training_run(job: Job, settings: Settings, train: list, validation: list | None):
    """The training core's input for this job: what to load on this host (identity.load_ref)
    and the public id the manifest records, never this host's path to it."""
    from workers.training import TrainingRun

    ref = load_ref(job.model, settings)
    return TrainingRun(job_id=job.id, tenant=job.tenant, base_model_ref=ref, base_model_id=public_id(ref, settings),
                       spec=job.spec, train_conversations=train, validation_conversations=validation,
                       work_dir=settings.jobs_dir / job.id, device=settings.device,
                       models_cache_dir=settings.models_dir)


def publish_adapter(settings: Settings, job: Job, outcome: TrainingOutcome):
    """Publish atomically (registry: tmp dir + fsync + rename). Idempotent per job: a previous
    run of this job that published and died before marking the job succeeded is reused."""
    from service.core.registry import AdapterRegistry

    registry = AdapterRegistry(settings.resolved_registry_dir)
    name = adapter_name_for_job(job.id, job.suffix)
    for manifest in registry.list_versions(job.tenant, name):
        if manifest.job_id == job.id:
            log.info("job %s: adapter %s v%d already published by an earlier run", job.id, name, manifest.version)
            return manifest
    return registry.publish(tenant=job.tenant, name=name, source_dir=outcome.adapter_dir,
                            manifest=outcome.adapter.manifest_fields(outcome.report))


def _remove_unpublished(path: Path | None) -> None:
    if path is not None and Path(path).exists():
        shutil.rmtree(path, ignore_errors=True)


def _finish(store, job_id: str, status: JobStatus, **kw) -> None:
    try:
        store.transition(job_id, status, **kw)
    except Conflict as exc:  # e.g. the reaper already finished it; the store keeps the first word
        log.warning("job %s: could not mark %s: %s", job_id, status.value, exc)


def run_job(store, settings: Settings, job_id: str, worker_id: str | None = None,
            *, train_fn=None) -> str:
    """Claim and run one job to a final state. Returns what happened (for logs and tests).
    `train_fn` defaults to workers.training.run_training."""
    worker_id = worker_id or worker_identity()
    job = claim_job(store, job_id, worker_id, settings)
    if job is None:
        return "skipped"
    attempt = job.attempts
    work_dir = settings.jobs_dir / job.id
    store.add_event(job_id, f"run {attempt} started on worker {worker_id}",
                    data={"attempt": attempt, "worker_id": worker_id})
    heartbeat = Heartbeat(store, job_id, worker_id, attempt, settings.heartbeat_interval_s)
    heartbeat.start()
    progress = StoreProgress(store, job_id, heartbeat)
    # The training core writes the finished adapter to work_dir/adapter (TrainingOutcome.adapter_dir);
    # known up front so a run that fails after saving it (e.g. during evaluation) cleans it too.
    adapter_dir: Path | None = work_dir / "adapter"
    try:
        try:
            if train_fn is None:
                from workers.training import run_training as train_fn
            train, validation = load_training_data(store, job, settings)
            outcome = train_fn(training_run(job, settings, train, validation), progress)
            adapter_dir = outcome.adapter_dir
            if progress.lost:
                return "lost"  # another run owns the job and its work_dir now: touch nothing
            if progress.should_stop():
                raise Cancelled("cancelled after training, before publishing")
            progress.progress(store.get_job(job_id).progress.model_copy(
                update={"phase": "publishing", "eta_seconds": 0.0}))
            manifest = publish_adapter(settings, job, outcome)
            store.update_progress(job_id, store.get_job(job_id).progress,
                                  trained_tokens=outcome.report.trained_tokens)
            results_file = write_results_file(store, settings.files_dir, job)
            result = {**outcome.report.job_result(),
                      "adapter": {"name": manifest.name, "version": manifest.version},
                      "result_files": [results_file.id]}
            try:
                store.transition(job_id, JobStatus.succeeded, fine_tuned_model=manifest.name, result=result)
            except Exception:
                discard_results_file(store, results_file)  # no results file for a job that did not succeed
                raise
            store.add_event(job_id, f"succeeded: adapter {manifest.name} v{manifest.version} published",
                            data={"fine_tuned_model": manifest.name, "version": manifest.version})
            _remove_unpublished(adapter_dir)  # the registry holds its copy now
            return "succeeded"
        except Cancelled:
            if progress.lost:
                return "lost"
            _finish(store, job_id, JobStatus.cancelled)
            store.add_event(job_id, "cancelled; no adapter published")
            return "cancelled"
        except TrainingError as exc:
            if progress.lost:
                return "lost"
            _finish(store, job_id, JobStatus.failed, error=_job_error(exc.code or "internal", exc.message, exc.param))
            store.add_event(job_id, f"failed ({exc.code}): {exc.message}", level="error")
            return "failed"
        except Conflict as exc:
            # The job changed under us (e.g. cancelled and finished elsewhere) at a transition.
            log.warning("job %s: %s", job_id, exc)
            return "conflict"
        except Exception as exc:
            log.exception("job %s: unexpected error", job_id)
            if progress.lost:
                return "lost"
            err = _classify_unexpected(exc)
            _finish(store, job_id, JobStatus.failed, error=err)
            store.add_event(job_id, f"failed ({err.code}): {err.message}", level="error")
            return "failed"
    finally:
        heartbeat.stop()
        if not progress.lost and _still_mine_or_ended(store, job_id, attempt):
            _remove_unpublished(adapter_dir)  # no-op after success (already removed)


def _still_mine_or_ended(store, job_id: str, attempt: int) -> bool:
    """May this run delete its work_dir/adapter? Not when another run owns the job now."""
    try:
        job = store.get_job(job_id)
    except Exception:
        return False
    return job.status in (JobStatus.failed, JobStatus.cancelled) or (
        job.status is JobStatus.running and job.attempts == attempt)


@shared_task(name=TRAIN_TASK, bind=True, acks_late=True, reject_on_worker_lost=True, ignore_result=True)
def train(self, job_id: str) -> str:
    from service.core.store import Store

    settings = get_settings()
    store = Store(settings.resolved_database_url)
    try:
        outcome = run_job(store, settings, job_id, worker_identity())
        log.info("train(%s): %s", job_id, outcome)
        return outcome
    finally:
        store.close()

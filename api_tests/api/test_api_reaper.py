"""The API runs the reaper sweep too: a job left `running` by a worker that vanished is
failed (or requeued) even when no worker process is alive to notice."""
import threading
import time

from fastapi.testclient import TestClient

from service.api.app import create_app
from service.core.domain import JobStatus, TrainingSpec
from service.core.store import Store
from workers.reaper import ReaperThread


def _wait_status(store, job_id, status, timeout=20.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = store.get_job(job_id)
        if job.status == status:
            return job
        time.sleep(0.1)
    raise AssertionError(f"job stayed {store.get_job(job_id).status}, expected {status}")


def test_api_fails_a_job_whose_worker_vanished(make_settings):
    settings = make_settings(heartbeat_timeout_s=1.0, reaper_interval_s=0.2, job_max_attempts=1)
    store = Store(settings.resolved_database_url)
    try:
        with TestClient(create_app(settings)):
            # The control for the test below: this app does run a reaper thread.
            assert [t for t in threading.enumerate() if isinstance(t, ReaperThread) and t.settings is settings]
            job = store.create_job(tenant="alice", model="m", spec=TrainingSpec(max_steps=1))
            # A worker on another host claimed it, then died: no heartbeat ever again.
            store.transition(job.id, JobStatus.running, worker_id="gone-host:4242")
            failed = _wait_status(store, job.id, JobStatus.failed)
            assert failed.error is not None and failed.error.code == "worker_lost"
    finally:
        store.close()


def test_api_reaper_can_be_switched_off(make_settings):
    settings = make_settings(heartbeat_timeout_s=1.0, reaper_interval_s=0.2, job_max_attempts=1, api_reaper=False)
    store = Store(settings.resolved_database_url)
    try:
        with TestClient(create_app(settings)):
            job = store.create_job(tenant="alice", model="m", spec=TrainingSpec(max_steps=1))
            store.transition(job.id, JobStatus.running, worker_id="gone-host:4242")
            # No sweep can ever run: this app started no reaper thread (checked directly, not
            # by sleeping a while and hoping a sweep would have happened by then).
            assert not [t for t in threading.enumerate()
                        if isinstance(t, ReaperThread) and t.settings is settings and t.is_alive()]
            assert store.get_job(job.id).status == JobStatus.running
    finally:
        store.close()

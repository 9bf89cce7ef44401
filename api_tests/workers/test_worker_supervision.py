"""Supervision logic against the real store and a real (dedicated) Redis, without training:
claiming deliveries, the reaper's requeue / worker_lost, and re-sending queued jobs the
broker lost."""
from __future__ import annotations

import socket
import subprocess
import time

import pytest

from harness import age_heartbeats
from service.core.domain import JobStatus, TrainingSpec
from workers.celery_app import make_celery, send_train
from workers.reaper import Reaper, RedisQueueProbe, owner_alive, worker_identity
from workers.tasks import claim_job

TENANT = "acme"
# Heartbeats are made stale by moving them STALE_S into the past (age_heartbeats), never by
# sleeping past a short timeout: on a busy machine a job meant to stay fresh would go stale too.
TIMEOUT_S, STALE_S = 60.0, 600.0


def new_job(store, status=JobStatus.queued):
    return store.create_job(tenant=TENANT, model="tiny", spec=TrainingSpec(max_steps=2), status=status)


def run_n_times(store, job_id: str, n: int, worker_id: str = "elsewhere:1"):
    """Leave the job running with attempts == n (n-1 earlier runs requeued)."""
    for i in range(n):
        if i:
            store.transition(job_id, JobStatus.queued)
        job = store.transition(job_id, JobStatus.running, worker_id=worker_id)
    return job


def dead_local_worker_id() -> str:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return f"{socket.gethostname()}:{proc.pid}"


# -- claim: what one delivery does -------------------------------------------------------
def test_claim_queued_then_duplicate_is_dropped(world, store):
    settings = world.settings()
    job = new_job(store)
    claimed = claim_job(store, job.id, "me:1", settings)
    assert claimed.status is JobStatus.running and claimed.attempts == 1 and claimed.worker_id == "me:1"
    # A second delivery while the owner heartbeats: nothing happens.
    assert claim_job(store, job.id, "other:2", settings) is None
    after = store.get_job(job.id)
    assert (after.status, after.attempts, after.worker_id) == (JobStatus.running, 1, "me:1")


def test_claim_final_job_is_idempotent(world, store):
    settings = world.settings()
    job = new_job(store)
    run_n_times(store, job.id, 1)
    store.transition(job.id, JobStatus.succeeded, fine_tuned_model="ft-x")
    assert claim_job(store, job.id, "me:1", settings) is None
    assert store.get_job(job.id).status is JobStatus.succeeded


def test_claim_takes_over_from_dead_owner_and_counts_the_run(world, store):
    settings = world.settings(heartbeat_timeout_s=TIMEOUT_S)
    job = new_job(store)
    run_n_times(store, job.id, 1, worker_id="gone-host:77")
    age_heartbeats(store, STALE_S, job.id)
    claimed = claim_job(store, job.id, "me:1", settings)
    assert claimed is not None and claimed.attempts == 2 and claimed.worker_id == "me:1"
    messages = [e.message for e in store.all_events(job.id)]
    assert any("redelivered" in m for m in messages)


def test_claim_sees_a_dead_local_pid_without_waiting_for_the_heartbeat(world, store):
    settings = world.settings(heartbeat_timeout_s=3600)
    job = new_job(store)
    running = run_n_times(store, job.id, 1, worker_id=dead_local_worker_id())
    assert not owner_alive(running, settings)
    claimed = claim_job(store, job.id, worker_identity(), settings)
    assert claimed is not None and claimed.attempts == 2


def test_claim_fails_worker_lost_when_runs_are_used_up(world, store):
    settings = world.settings(heartbeat_timeout_s=TIMEOUT_S, job_max_attempts=2)
    job = new_job(store)
    run_n_times(store, job.id, 2)
    age_heartbeats(store, STALE_S, job.id)
    assert claim_job(store, job.id, "me:1", settings) is None
    failed = store.get_job(job.id)
    assert failed.status is JobStatus.failed and failed.error.code == "worker_lost"


def test_claim_cancels_a_dead_job_whose_cancel_was_requested(world, store):
    settings = world.settings(heartbeat_timeout_s=TIMEOUT_S)
    job = new_job(store)
    run_n_times(store, job.id, 1)
    store.request_cancel(job.id, TENANT)
    age_heartbeats(store, STALE_S, job.id)
    assert claim_job(store, job.id, "me:1", settings) is None
    assert store.get_job(job.id).status is JobStatus.cancelled


# -- the reaper ----------------------------------------------------------------------------
@pytest.fixture
def reaper_parts(world, store):
    def make(clock=time.monotonic, **overrides):
        settings = world.settings(**overrides)
        app = make_celery(settings, name="tuneserve-test")
        probe = RedisQueueProbe(settings.redis_url, settings.task_queue)
        sent: list[str] = []

        def send(job_id):
            sent.append(job_id)
            send_train(app, settings, job_id)

        return Reaper(store, settings, send, probe, clock=clock), probe, sent
    return make


def test_reaper_fails_vanished_worker_with_attempts_exhausted(reaper_parts, store):
    """(d) a job whose worker vanished and that is never redelivered: the reaper ends it."""
    reaper, probe, sent = reaper_parts(heartbeat_timeout_s=TIMEOUT_S, job_max_attempts=3)
    job = new_job(store)
    run_n_times(store, job.id, 3, worker_id="vanished-host:4242")
    fresh = new_job(store)
    run_n_times(store, fresh.id, 1, worker_id="alive-host:1")
    age_heartbeats(store, STALE_S)
    store.heartbeat(fresh.id, "alive-host:1")  # this one's worker is alive
    report = reaper.run_once()
    assert report.failed == [job.id] and not report.requeued and sent == []
    failed = store.get_job(job.id)
    assert failed.status is JobStatus.failed
    assert failed.error.code == "worker_lost" and "vanished-host:4242" in failed.error.message
    assert store.get_job(fresh.id).status is JobStatus.running
    # Idempotent: a second sweep (or another worker's reaper) finds nothing to do.
    again = reaper.run_once()
    assert not (again.failed or again.requeued or again.resent)


def test_reaper_requeues_stale_running_job_into_the_broker(reaper_parts, store):
    reaper, probe, sent = reaper_parts(heartbeat_timeout_s=TIMEOUT_S, job_max_attempts=3)
    job = new_job(store)
    run_n_times(store, job.id, 1, worker_id="vanished-host:4242")
    age_heartbeats(store, STALE_S, job.id)
    report = reaper.run_once()
    assert report.requeued == [job.id] and sent == [job.id]
    assert store.get_job(job.id).status is JobStatus.queued
    assert job.id in probe.job_ids()  # a real train(job_id) message sits in the queue


def test_reaper_requeues_job_of_dead_local_process_at_once(reaper_parts, store):
    reaper, probe, sent = reaper_parts(heartbeat_timeout_s=3600)
    job = new_job(store)
    run_n_times(store, job.id, 1, worker_id=dead_local_worker_id())
    assert reaper.run_once().requeued == [job.id]


def test_reaper_resends_queued_jobs_the_broker_lost_after_grace(reaper_parts, store, own_redis, world):
    now = [1000.0]  # the reaper's clock, moved by the test: the grace passes without a sleep
    reaper, probe, sent = reaper_parts(clock=lambda: now[0], requeue_grace_s=0.5)
    settings = world.settings()
    app = make_celery(settings, name="tuneserve-test")
    in_queue = new_job(store)
    send_train(app, settings, in_queue.id)
    lost = new_job(store)  # committed, but its message never reached (or was lost by) Redis
    assert reaper.run_once().resent == []  # first sighting starts the grace period
    now[0] += 0.6
    report = reaper.run_once()
    assert report.resent == [lost.id] and sent == [lost.id]
    assert {in_queue.id, lost.id} <= probe.job_ids()
    assert reaper.run_once().resent == []  # now in the broker: not sent twice
    assert own_redis.client().llen(settings.task_queue) == 2

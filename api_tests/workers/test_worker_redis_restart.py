"""Issue 6 item 3: Redis restarted with jobs queued, none lost. A dedicated redis-server on its
own port (never the machine's shared one) without persistence is SIGKILLed while a worker
trains one job and two more wait in the queue, then restarted EMPTY on the same port. The
worker reconnects by itself and its reaper re-sends the queued jobs the broker lost (the
store is the truth); every job completes."""
from __future__ import annotations

import secrets
import time

import pytest

from service.core.domain import JobStatus
from service.core.store import Store
from workers.celery_app import make_celery, send_train
from worker_harness import (
    Env,
    create_job,
    dump_worker_logs,
    tiny_spec,
    training_file,
    wait_for,
    wait_status,
)

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def test_redis_restarted_empty_with_jobs_queued_loses_none(tmp_path, own_redis):
    world = Env(data_dir=tmp_path / "data", redis_url=own_redis.url, queue=f"training-{secrets.token_hex(4)}",
                overrides={"TUNESERVE_REAPER_INTERVAL_S": "0.5", "TUNESERVE_REQUEUE_GRACE_S": "1.5"})
    world.data_dir.mkdir(parents=True)
    store = Store(world.db_url)
    try:
        world.start_worker()
        settings = world.settings()
        app = make_celery(settings, name="tuneserve-test")
        train_id = training_file(store, world.data_dir, 8)
        # The first job runs long enough to still be training when Redis dies.
        # (40 steps: a wide margin over the few store writes between its first step and the kill)
        first = create_job(store, train_id, tiny_spec(max_steps=40, checkpoint_steps=1000, eval_max_samples=0))
        send_train(app, settings, first.id)
        wait_for(lambda: store.get_job(first.id).progress.step >= 1, 120, "the first job to train")
        queued = [create_job(store, train_id, tiny_spec(max_steps=2, eval_max_samples=0)) for _ in range(2)]
        for job in queued:
            send_train(app, settings, job.id)
        redis = own_redis.client()
        assert redis.llen(settings.task_queue) == 2  # waiting behind the busy worker (prefetch 1)
        assert store.get_job(first.id).status is JobStatus.running

        own_redis.kill()
        time.sleep(1.0)
        own_redis.start()  # same port, no persistence: an empty broker
        assert own_redis.client().llen(settings.task_queue) == 0
        assert own_redis.client().dbsize() == 0

        t0 = time.monotonic()
        for job in [first, *queued]:
            done = wait_status(store, job.id, [JobStatus.succeeded], 120, lambda: dump_worker_logs(world))
            assert done.fine_tuned_model
        recovery = time.monotonic() - t0
        for job in queued:
            messages = [e.message for e in store.all_events(job.id)]
            assert any("broker lost" in m for m in messages), messages
            assert store.get_job(job.id).attempts == 1  # run once: no duplicate execution
        print(f"\n(e) all 3 jobs succeeded {recovery:.1f} s after Redis came back empty")
    finally:
        world.stop_all()
        store.close()

"""End to end through a real Celery worker PROCESS on a real (dedicated) Redis, training the
tiny ChatGLM3 fixture in 4-bit (NF4 + double quant) for a few steps: success with a
published adapter, cancellation, and a SIGKILLed worker whose job is redelivered to a new
worker process and resumes from its checkpoint."""
from __future__ import annotations

import signal
import time

import pytest

from service.core.domain import JobStatus, adapter_name_for_job
from service.core.registry import AdapterRegistry
from workers.celery_app import make_celery, send_train
from worker_harness import (
    TENANT,
    broker_state,
    create_job,
    dump_worker_logs,
    loss_points,
    tiny_spec,
    training_file,
    validation_file,
    wait_for,
    wait_status,
)

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

JOB_TIMEOUT = 240  # generous: the test machines are shared and noisy


def _complete_checkpoints(work_dir):
    root = work_dir / "checkpoints"
    if not root.is_dir():
        return []
    return sorted(int(d.name[5:]) for d in root.iterdir()
                  if d.name.startswith("step-") and (d / "state.json").is_file())


def _adapter_tensors(path):
    from safetensors.torch import load_file

    return load_file(str(path / "adapter_model.safetensors"))


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """Shared across tests: the adapter of (a), compared with the resumed run of (c)."""
    return {}


def _submit_tiny_job(world, store):
    """A tiny job with a validation file, committed to the store and sent to the broker."""
    settings = world.settings()
    app = make_celery(settings, name="tuneserve-test")
    train_id = training_file(store, world.data_dir, 16)
    val_id = validation_file(store, world.data_dir, 4)
    job = create_job(store, train_id, tiny_spec(), validation_id=val_id, suffix="e2e")
    send_train(app, settings, job.id)
    return settings, job


def test_job_runs_to_succeeded_with_loss_events_and_published_adapter(world, store, reference):
    """(a)"""
    t0 = time.monotonic()
    worker = world.start_worker()
    settings, job = _submit_tiny_job(world, store)

    done = wait_status(store, job.id, [JobStatus.succeeded], JOB_TIMEOUT, lambda: dump_worker_logs(world))
    elapsed = time.monotonic() - t0
    name = adapter_name_for_job(job.id, "e2e")
    assert done.fine_tuned_model == name and done.error is None and done.attempts == 1
    assert done.finished_at is not None and done.trained_tokens and done.trained_tokens > 0

    points = loss_points(store, job.id)
    steps = [s for s, _, _ in points]
    assert steps == list(range(1, 9)), points
    losses = [loss for _, loss, _ in points]
    assert min(losses[-3:]) < losses[0], f"loss did not fall: {losses}"
    assert done.progress.step == 8 and done.progress.total_steps == 8

    registry = AdapterRegistry(settings.resolved_registry_dir)
    path, manifest = registry.resolve(TENANT, name)
    registry.verify(path, manifest)  # sha256 of the published files
    assert manifest.job_id == job.id and manifest.version == 1
    assert (path / "adapter_config.json").is_file() and (path / "adapter_model.safetensors").is_file()
    assert "metrics" in done.result and done.result["adapter"] == {"name": name, "version": 1}
    # Nothing half-published: no temp dirs left in the registry.
    assert not [p for p in (settings.resolved_registry_dir / TENANT / name).iterdir() if p.name.startswith(".")]
    assert worker.alive()
    reference["adapter"] = _adapter_tensors(path)
    reference["losses"] = points
    print(f"\n(a) job succeeded in {elapsed:.1f} s including worker start")


def test_cancel_while_running_ends_cancelled_without_adapter(world, store):
    """(b)"""
    world.start_worker()
    settings = world.settings()
    app = make_celery(settings, name="tuneserve-test")
    train_id = training_file(store, world.data_dir, 16)
    job = create_job(store, train_id, tiny_spec(max_steps=2000, checkpoint_steps=1000))
    send_train(app, settings, job.id)

    wait_for(lambda: store.get_job(job.id).progress.step >= 2, JOB_TIMEOUT, "training steps")
    t_cancel = time.monotonic()
    store.request_cancel(job.id, TENANT)
    done = wait_status(store, job.id, [JobStatus.cancelled], 60, lambda: dump_worker_logs(world))
    latency = time.monotonic() - t_cancel
    assert done.fine_tuned_model is None and done.progress.step < 2000
    registry = AdapterRegistry(settings.resolved_registry_dir)
    assert registry.list(TENANT) == []
    assert not (settings.resolved_registry_dir / TENANT).exists() or \
        not any((settings.resolved_registry_dir / TENANT).iterdir())
    assert any("cancelled" in e.message for e in store.all_events(job.id))
    print(f"\n(b) cancelled {latency:.2f} s after the request, at step {done.progress.step}")


def test_sigkilled_worker_is_redelivered_and_resumes_from_checkpoint(world, store, reference):
    """(c) Redelivery by the broker alone (reaper off): the killed worker's unacked message
    comes back after the visibility timeout; the new worker sees the old owner's process is
    gone, takes the job over and resumes from the last checkpoint."""
    world.overrides.update({"TUNESERVE_BROKER_VISIBILITY_TIMEOUT_S": "2", "TUNESERVE_REAPER_INTERVAL_S": "0",
                            "TUNESERVE_HEARTBEAT_TIMEOUT_S": "600"})
    first = world.start_worker()
    settings, job = _submit_tiny_job(world, store)

    work_dir = settings.jobs_dir / job.id
    wait_for(lambda: _complete_checkpoints(work_dir), JOB_TIMEOUT, "the first checkpoint", interval=0.02)
    first.kill(signal.SIGKILL)
    killed_at = store.get_job(job.id)
    assert killed_at.status is JobStatus.running, "the job finished before the kill; make it longer"
    ckpt = max(_complete_checkpoints(work_dir))
    steps_before = [s for s, _, _ in loss_points(store, job.id)]

    print("\n(c) before the new worker:", broker_state(world.redis_url, world.queue))
    t0 = time.monotonic()
    world.start_worker()
    done = wait_status(store, job.id, [JobStatus.succeeded], JOB_TIMEOUT, lambda: dump_worker_logs(world))
    recovery = time.monotonic() - t0
    assert done.attempts == 2
    messages = [e.message for e in store.all_events(job.id)]
    assert any("redelivered" in m for m in messages), messages

    points = loss_points(store, job.id)
    run1 = [s for s, _, a in points if a == 1]
    run2 = [s for s, _, a in points if a == 2]
    assert run1 == steps_before and run1[:ckpt] == list(range(1, ckpt + 1))
    # The loss curve continues from the checkpoint, not from step 0.
    assert run2 == list(range(ckpt + 1, 9)), (ckpt, points)
    # Same seed, same data, exact resume: the steps re-run after the checkpoint match run 1.
    by_step_1 = {s: loss for s, loss, a in points if a == 1}
    for s, loss, a in points:
        if a == 2 and s in by_step_1:
            assert loss == pytest.approx(by_step_1[s], rel=1e-4, abs=1e-5)

    registry = AdapterRegistry(settings.resolved_registry_dir)
    path, manifest = registry.resolve(TENANT, done.fine_tuned_model)
    registry.verify(path, manifest)
    if "adapter" in reference:  # the uninterrupted run (a): same spec, data and seed
        ref = reference["adapter"]
        got = _adapter_tensors(path)
        assert ref.keys() == got.keys()
        worst = max(float((ref[k] - got[k]).abs().max()) for k in ref)
        assert worst < 1e-4, f"resumed adapter differs from the uninterrupted one by {worst}"
        reference["worst"] = worst
        ref_losses = {s: loss for s, loss, _ in reference["losses"]}
        for s, loss, _ in points:
            assert loss == pytest.approx(ref_losses[s], rel=1e-4, abs=1e-5)
    print(f"\n(c) killed after checkpoint step {ckpt} (steps seen {steps_before}); recovered and "
          f"finished {recovery:.1f} s after the new worker started; max |adapter - uninterrupted| = "
          f"{reference.get('worst', 'n/a')}")

"""The train task's outcomes, in process against the real store and registry: every way a run
ends leaves the job final with a clear error and no adapter behind, except a run that lost
the job to another run, which must touch nothing. Stub training functions stand in for the
training core only where the point is the task's handling of what training raises."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from service.core.config import DEMO_MODEL_NAME
from service.core.domain import AdapterDraft, JobStatus, TrainingReport, adapter_name_for_job
from service.core.errors import Cancelled, TrainingError
from service.core.registry import AdapterRegistry
from service.core.identity import demo_dir
from workers.tasks import publish_adapter, run_job, training_run
from worker_harness import TENANT, create_job, tiny_spec, training_file, validation_file, wait_for

pytestmark = pytest.mark.slow  # imports torch (workers.training) once


def _fake_adapter(dir_: Path) -> Path:
    dir_.mkdir(parents=True, exist_ok=True)
    (dir_ / "adapter_config.json").write_text(json.dumps({"r": 8}))
    (dir_ / "adapter_model.safetensors").write_bytes(b"\0" * 64)
    return dir_


def FakeOutcome(adapter_dir: Path, job_id: str):  # noqa: N802 (stands in for the training core's outcome)
    from workers.training import TrainingOutcome

    return TrainingOutcome(
        adapter_dir=adapter_dir,
        adapter=AdapterDraft(base_model="tiny", target_modules=["q_proj"], r=8, lora_alpha=16.0, job_id=job_id),
        report=TrainingReport(spec=tiny_spec(), steps=1, total_steps=1, trained_tokens=10, label_tokens=4,
                              metrics={"train_loss": 1.0}))


def _job(world, store):
    return create_job(store, training_file(store, world.data_dir, 4), tiny_spec())


def test_missing_base_model_fails_model_not_found_without_adapter(world, store):
    settings = world.settings(base_model=str(world.data_dir / "no-such-model"))
    job = _job(world, store)
    assert run_job(store, settings, job.id, "me:1") == "failed"
    done = store.get_job(job.id)
    assert done.status is JobStatus.failed and done.error.code == "model_not_found", done.error
    assert "no-such-model" in done.error.message
    assert AdapterRegistry(settings.resolved_registry_dir).list(TENANT) == []


def test_training_file_gone_fails_invalid_data(world, store):
    settings = world.settings()
    job = _job(world, store)
    Path(store.get_file(job.training_file, None).path).unlink()
    assert run_job(store, settings, job.id, "me:1") == "failed"
    done = store.get_job(job.id)
    assert done.error.code == "invalid_data" and "training_file" in done.error.message


def test_training_error_and_unexpected_error_end_failed_and_remove_the_adapter_dir(world, store):
    settings = world.settings()

    def oom(run, progress):
        _fake_adapter(Path(run.work_dir) / "adapter")
        raise TrainingError("out of memory at step 3", code="out_of_memory")

    def bug(run, progress):
        _fake_adapter(Path(run.work_dir) / "adapter")
        raise KeyError("boom")

    for fn, code, text in ((oom, "out_of_memory", "step 3"), (bug, "internal", "KeyError")):
        job = _job(world, store)
        assert run_job(store, settings, job.id, "me:1", train_fn=fn) == "failed"
        done = store.get_job(job.id)
        assert done.error.code == code and text in done.error.message, done.error
        assert not (settings.jobs_dir / job.id / "adapter").exists()
    assert AdapterRegistry(settings.resolved_registry_dir).list(TENANT) == []


def test_cancel_seen_by_training_ends_cancelled_and_removes_unpublished_adapter(world, store):
    settings = world.settings()
    job = _job(world, store)

    def train(run, progress):
        _fake_adapter(Path(run.work_dir) / "adapter")
        store.request_cancel(run.job_id, TENANT)
        assert progress.should_stop()
        raise Cancelled("cancelled at step 1")

    assert run_job(store, settings, job.id, "me:1", train_fn=train) == "cancelled"
    assert store.get_job(job.id).status is JobStatus.cancelled
    assert not (settings.jobs_dir / job.id / "adapter").exists()
    assert AdapterRegistry(settings.resolved_registry_dir).list(TENANT) == []


def test_cancel_after_training_before_publish_publishes_nothing(world, store):
    settings = world.settings()
    job = _job(world, store)

    def train(run, progress):
        out = FakeOutcome(_fake_adapter(Path(run.work_dir) / "adapter"), run.job_id)
        store.request_cancel(run.job_id, TENANT)  # arrives after the last should_stop() of training
        return out

    assert run_job(store, settings, job.id, "me:1", train_fn=train) == "cancelled"
    assert store.get_job(job.id).status is JobStatus.cancelled
    assert AdapterRegistry(settings.resolved_registry_dir).list(TENANT) == []
    assert not (settings.jobs_dir / job.id / "adapter").exists()


def test_success_publishes_once_and_stores_metrics(world, store):
    settings = world.settings()
    job = _job(world, store)
    train = lambda run, progress: FakeOutcome(_fake_adapter(Path(run.work_dir) / "adapter"), run.job_id)  # noqa: E731
    assert run_job(store, settings, job.id, "me:1", train_fn=train) == "succeeded"
    done = store.get_job(job.id)
    name = adapter_name_for_job(job.id, None)
    assert done.fine_tuned_model == name and done.trained_tokens == 10
    # The report, as is: the job's result and the manifest are views of it.
    report = FakeOutcome(Path("."), job.id).report
    assert done.result["metrics"] == {"train_loss": 1.0} and done.result["training"] == report.training()
    assert done.result["training"]["steps"] == 1
    assert done.result["adapter"] == {"name": name, "version": 1}
    assert done.progress.phase == "publishing" and done.progress.eta_seconds == 0  # the last phase it was in
    _, manifest = AdapterRegistry(settings.resolved_registry_dir).resolve(TENANT, name)
    assert manifest.training == report.manifest_training() and manifest.metrics == {"train_loss": 1.0}
    assert manifest.job_id == job.id and manifest.base_model == "tiny"
    # A redelivery of a job that published but died before `succeeded`: no second version.
    again = publish_adapter(settings, done, FakeOutcome(_fake_adapter(world.data_dir / "other"), done.id))
    assert again.version == 1
    assert [m.version for m in AdapterRegistry(settings.resolved_registry_dir).list_versions(TENANT, name)] == [1]


def test_run_that_lost_the_job_stops_and_writes_nothing(world, store):
    """The reaper requeued the job while this run was unreachable; another run took it over.
    This run's heartbeat notices (attempts changed), should_stop() turns true, and it must not
    mark the job cancelled or delete the work_dir the new owner uses."""
    settings = world.settings(heartbeat_interval_s=0.1)
    job = _job(world, store)

    def train(run, progress):
        adapter = _fake_adapter(Path(run.work_dir) / "adapter")
        store.transition(run.job_id, JobStatus.queued)  # the reaper
        store.transition(run.job_id, JobStatus.running, worker_id="new-owner:2")  # the new run
        wait_for(progress.should_stop, 10, "the run to notice it lost the job")
        progress.event("late event from the old run")  # dropped
        assert adapter.exists()
        raise Cancelled("stopping")

    assert run_job(store, settings, job.id, "me:1", train_fn=train) == "lost"
    now = store.get_job(job.id)
    assert (now.status, now.attempts, now.worker_id) == (JobStatus.running, 2, "new-owner:2")
    assert (settings.jobs_dir / job.id / "adapter").exists()
    assert not any("late event" in e.message for e in store.all_events(job.id))


def test_heartbeat_refreshes_while_training(world, store):
    settings = world.settings(heartbeat_interval_s=0.1)
    job = _job(world, store)
    seen = []

    def train(run, progress):
        first = store.get_job(run.job_id).heartbeat_at
        # Poll for a newer beat (a fixed sleep could end before a busy machine's next beat).
        later = wait_for(lambda: (hb := store.get_job(run.job_id).heartbeat_at) > first and hb, 60,
                         "a heartbeat while training")
        seen.append((first, later))
        return FakeOutcome(_fake_adapter(Path(run.work_dir) / "adapter"), run.job_id)

    assert run_job(store, settings, job.id, "me:1", train_fn=train) == "succeeded"
    first, later = seen[0]
    assert later > first


def test_success_attaches_the_metrics_csv_as_a_result_file(world, store):
    settings = world.settings()
    job = _job(world, store)

    def train(run, progress):  # the events as the training loop and the recipe write them
        for step, loss, acc in ((1, 2.5, 0.25), (2, 2.0, 0.375)):
            progress.event(f"step {step}", data={"step": step, "loss": loss, "mean_token_accuracy": acc,
                                                 "total_steps": 2})
        progress.event("validation loss 1.7500, token accuracy 0.5000",
                       data={"step": 2, "eval_loss": 1.75, "eval_mean_token_accuracy": 0.5})
        return FakeOutcome(_fake_adapter(Path(run.work_dir) / "adapter"), run.job_id)

    assert run_job(store, settings, job.id, "me:1", train_fn=train) == "succeeded"
    (file_id,) = store.get_job(job.id).result["result_files"]
    info = store.get_file(file_id, TENANT)
    assert info.purpose == "fine-tune-results" and info.format is None and info.rows == 2
    assert Path(info.path).read_text() == ("step,train_loss,train_mean_token_accuracy,valid_loss,"
                                           "valid_mean_token_accuracy\n1,2.5,0.25,,\n2,2.0,0.375,1.75,0.5\n")
    assert [f.id for f in store.list_files(TENANT, purpose="fine-tune-results")] == [file_id]


def test_real_training_fills_the_metrics_csv_token_accuracy_columns(world, store):
    """Real training on the tiny fixture: every step's row has its loss and token accuracy, and
    the validation pass after training fills the last row's valid columns."""
    import csv
    import io

    settings = world.settings()
    spec = tiny_spec(max_steps=3, checkpoint_steps=1000, eval_max_samples=0)
    job = create_job(store, training_file(store, world.data_dir, 4), spec,
                     validation_id=validation_file(store, world.data_dir, 2))
    assert run_job(store, settings, job.id, "me:1") == "succeeded", store.get_job(job.id).error
    done = store.get_job(job.id)
    (file_id,) = done.result["result_files"]
    rows = list(csv.DictReader(io.StringIO(Path(store.get_file(file_id, TENANT).path).read_text())))
    assert [int(r["step"]) for r in rows] == [1, 2, 3]
    for r in rows:
        assert float(r["train_loss"]) > 0 and 0 <= float(r["train_mean_token_accuracy"]) <= 1, r
    assert float(rows[-1]["valid_loss"]) == done.result["metrics"]["eval_loss"]
    assert float(rows[-1]["valid_mean_token_accuracy"]) == done.result["metrics"]["eval_mean_token_accuracy"]
    assert 0 <= done.result["metrics"]["eval_mean_token_accuracy"] <= 1
    assert done.progress.mean_token_accuracy == float(rows[-1]["train_mean_token_accuracy"])


def test_dataset_swapped_after_creation_is_refused_by_the_worker(world, store, tmp_path):
    """The API checked the source when the job was created; then a file in it became a link to a
    file outside the dataset roots. The worker resolves again before reading: the job fails
    invalid_data naming the field, and the outside file's content is nowhere in the error."""
    from service.core.datasets import check_dataset_source
    from service.core.domain import DatasetSource

    settings = world.settings()
    src_dir = settings.resolved_dataset_roots[0] / "adgen"
    src_dir.mkdir(parents=True)
    (src_dir / "train.csv").write_text("content,summary\na,b\n")
    secret = tmp_path / "secret.csv"
    secret.write_text("SECRET_TOKEN_77aa,other_col\nx,y\n")
    source = DatasetSource(path=str(src_dir))
    check_dataset_source(source, settings.resolved_dataset_roots)  # what the API did at creation
    job = store.create_job(tenant=TENANT, model="tiny", spec=tiny_spec(), training_dataset=source)
    (src_dir / "train.csv").unlink()
    (src_dir / "train.csv").symlink_to(secret)
    assert run_job(store, settings, job.id, "me:1") == "failed"
    done = store.get_job(job.id)
    assert done.error.code == "invalid_data" and done.error.param == "training_dataset.path", done.error
    assert "outside" in done.error.message and "SECRET_TOKEN" not in done.error.message


def test_the_manifest_records_the_public_id(world, store):
    """The training run loads this host's demo dir but records its public id."""
    settings = world.settings(base_model="")
    job = store.create_job(tenant=TENANT, model=DEMO_MODEL_NAME, spec=tiny_spec(),
                           training_file=training_file(store, world.data_dir, 2))
    run = training_run(job, settings, [], None)
    assert run.base_model_ref == str(demo_dir(settings)) and run.base_model_id == DEMO_MODEL_NAME

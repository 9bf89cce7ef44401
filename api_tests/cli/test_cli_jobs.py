"""`tuneserve jobs ...` / `adapters list` through the real API app (TestClient injected as the
CLI's HTTP client; engine off). A thread plays the worker for `jobs follow`."""
from __future__ import annotations

import json
import threading
import time
from pathlib import Path

from service.cli import app
from service.core.domain import JobError, JobProgress, JobStatus, TrainingSpec

SAMPLE = Path(__file__).resolve().parents[2] / "service" / "data" / "advertisegen_sample.jsonl"


def _job(store, **kw):
    return store.create_job(tenant="default", model="demo-base", spec=TrainingSpec(max_steps=4), **kw)


def test_jobs_list_get_cancel(api, invoke):
    _client, store, _key, _settings = api
    res = invoke("jobs", "list")
    assert res.exit_code == 0, res.output
    assert "ftjob-" not in res.output

    a, b = _job(store), _job(store)
    res = invoke("jobs", "list")
    assert res.exit_code == 0, res.output
    assert a.id in res.output and b.id in res.output
    assert res.output.index(b.id) < res.output.index(a.id)  # newest first

    res = invoke("jobs", "list", "--limit", "1")
    assert b.id in res.output and a.id not in res.output
    assert f"--after {b.id}" in res.output

    res = invoke("jobs", "get", a.id)
    assert res.exit_code == 0, res.output
    body = json.loads(res.output)
    assert body["id"] == a.id and body["status"] == "queued" and body["object"] == "fine_tuning.job"

    res = invoke("jobs", "cancel", a.id)
    assert res.exit_code == 0, res.output
    assert "cancelled" in res.output
    assert store.get_job(a.id).status is JobStatus.cancelled

    res = invoke("jobs", "get", "ftjob-000000000000000000000000")
    assert res.exit_code == 1 and "404" in res.output


def test_jobs_create_uploads_and_parses_hyperparameters(api, invoke):
    _client, store, _key, _settings = api
    res = invoke("jobs", "create", "--file", str(SAMPLE), "--suffix", "ads",
                 "--hp", "max_steps=5", "--hp", "learning_rate=0.001", "--hp", "lr_scheduler=cosine",
                 "--hp", "n_epochs=auto")
    assert res.exit_code == 0, res.output
    assert "uploaded" in res.output and "file-" in res.output
    [job], _ = store.list_jobs("default")
    assert f"created {job.id}" in res.output
    assert job.suffix == "ads" and job.model == "demo-base"  # the server's base model, from /v1/models
    assert job.spec.max_steps == 5 and job.spec.learning_rate == 0.001 and job.spec.lr_scheduler == "cosine"
    assert store.get_file(job.training_file, "default").rows == 300


def test_jobs_create_reports_every_bad_hyperparameter(api, invoke):
    _client, store, _key, _settings = api
    res = invoke("jobs", "create", "--file", str(SAMPLE), "--hp", "lora_r=0", "--hp", "warmup_ratio=7")
    assert res.exit_code == 1
    assert "lora_r" in res.output and "warmup_ratio" in res.output
    assert store.list_jobs("default")[0] == []  # nothing half-made
    res = invoke("jobs", "create", "--hp", "max_steps=1")
    assert res.exit_code != 0 and "--file" in res.output
    res = invoke("jobs", "create", "--file", str(SAMPLE), "--hp", "novalue")
    assert res.exit_code != 0 and "key=value" in res.output


def _play_worker(store, job_id: str, *, fail: bool = False) -> threading.Thread:
    def run():
        time.sleep(0.2)
        store.transition(job_id, JobStatus.running, worker_id="test-worker")
        store.add_event(job_id, "training started: 4 steps")
        for step in range(1, 5):
            store.update_progress(job_id, JobProgress(step=step, total_steps=4, loss=2.0 / step,
                                                      eta_seconds=4 - step))
            store.add_event(job_id, f"step {step}", type="metrics", data={"step": step, "loss": 2.0 / step})
            time.sleep(0.1)
        if fail:
            store.transition(job_id, JobStatus.failed,
                             error=JobError(code="out_of_memory", message="CUDA out of memory at step 4"))
        else:
            store.add_event(job_id, "adapter published")
            store.transition(job_id, JobStatus.succeeded, fine_tuned_model="ft-ads-abc123")
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def test_jobs_follow_until_succeeded(api, invoke):
    _client, store, _key, _settings = api
    job = _job(store)
    worker = _play_worker(store, job.id)
    res = invoke("jobs", "follow", job.id, "--interval", "0.05")
    worker.join(5)
    assert res.exit_code == 0, res.output
    assert "training started: 4 steps" in res.output and "adapter published" in res.output
    assert "step 1" not in res.output  # metrics events drive the bar, not the log
    assert "succeeded" in res.output and "ft-ads-abc123" in res.output
    assert "4/4" in res.output
    assert "tuneserve chat --adapter ft-ads-abc123" in res.output


def test_jobs_follow_failed_exits_nonzero_with_the_error(api, invoke):
    _client, store, _key, _settings = api
    job = _job(store)
    worker = _play_worker(store, job.id, fail=True)
    res = invoke("jobs", "follow", job.id, "--interval", "0.05")
    worker.join(5)
    assert res.exit_code == 1
    assert "failed" in res.output and "out_of_memory" in res.output and "CUDA out of memory" in res.output


def test_adapters_list_empty(invoke):
    res = invoke("adapters", "list")
    assert res.exit_code == 0, res.output
    assert "name" in res.output


def test_saved_key_is_the_default_and_bad_keys_say_how_to_fix(api, runner, cli_env):
    client, store, key, _settings = api
    # No --api-key / TUNESERVE_API_KEY: the key `tuneserve up` saved is used.
    (cli_env / "api_key").write_text(key + "\n")
    res = runner.invoke(app, ["jobs", "list"], obj={"http": client})
    assert res.exit_code == 0, res.output

    res = runner.invoke(app, ["jobs", "list", "--api-key", "ts-wrong"], obj={"http": client})
    assert res.exit_code == 1
    assert "401" in res.output and "TUNESERVE_API_KEY" in res.output


def test_unreachable_server(cli_env, runner):
    res = runner.invoke(app, ["jobs", "list", "--url", "http://127.0.0.1:9", "--api-key", "x"])
    assert res.exit_code == 2
    assert "cannot reach http://127.0.0.1:9" in res.output


def _quality_metrics(n_rows: int) -> dict:
    rows = [{"prompt": f"prompt-{i}", "reference": f"reference-{i}", "base": f"base-reply-{i}",
             "adapter": f"adapter-reply-{i}"} for i in range(n_rows)]
    return {"train_loss": 1.5, "eval_loss": 1.75,
            "quality": {"split": "validation", "n_samples": n_rows, "before_after": rows,
                        "base": {"bleu-4": 1.0, "rouge-l": 5.0, "n_samples": n_rows},
                        "adapter": {"bleu-4": 4.5, "rouge-l": 9.0, "n_samples": n_rows},
                        "metric_descriptions": {"bleu-4": "BLEU-4 ...", "rouge-l": "ROUGE-L ..."}}}


def test_follow_ends_with_scores_not_samples_and_samples_has_its_command(api, invoke):
    """`jobs follow` (and so `jobs create --follow`) ends with a short panel: losses and one line
    per metric, base -> adapter; the 40 before/after rows are `jobs samples ID`."""
    _client, store, _key, _settings = api
    job = _job(store)
    store.transition(job.id, JobStatus.running, worker_id="test-worker")
    store.transition(job.id, JobStatus.succeeded, fine_tuned_model="ft-q-abc",
                     result={"metrics": _quality_metrics(40)})
    res = invoke("jobs", "follow", job.id, "--interval", "0.05")
    assert res.exit_code == 0, res.output
    assert "prompt-" not in res.output and "adapter-reply" not in res.output
    assert "train_loss=1.5" in res.output and "eval_loss=1.75" in res.output
    assert "bleu-4: 1.0 -> 4.5 (+3.50)" in res.output and "rouge-l: 5.0 -> 9.0 (+4.00)" in res.output
    assert f"tuneserve jobs samples {job.id}" in res.output
    assert len(res.output.splitlines()) < 25, res.output

    res = invoke("jobs", "samples", job.id, "--limit", "3")
    assert res.exit_code == 0, res.output
    for i in range(3):
        assert f"adapter-reply-{i}" in res.output and f"reference-{i}" in res.output
    assert "adapter-reply-3" not in res.output and "3 of 40 rows" in res.output
    res = invoke("jobs", "samples", job.id, "--json", "--limit", "100")
    assert len(json.loads(res.output)["data"]) == 40


def test_follow_shows_the_phase(api, invoke, monkeypatch):
    """A line when the phase changes (`phase: evaluating 3/6`; the bar's description says it live
    on a terminal); the job ends at the first poll's sleep (where the test moves it on: no timing)."""
    import service.cli as cli

    _client, store, _key, _settings = api
    job = _job(store)
    store.transition(job.id, JobStatus.running, worker_id="test-worker")
    store.update_progress(job.id, JobProgress(step=4, total_steps=4, loss=0.5, eval_loss=0.75, phase="evaluating",
                                              eval_done=3, eval_total=6, eta_seconds=12))

    def finish(_seconds):
        store.update_progress(job.id, JobProgress(step=4, total_steps=4, phase="publishing", eta_seconds=0))
        store.transition(job.id, JobStatus.succeeded, fine_tuned_model="ft-phase-abc")

    monkeypatch.setattr(cli.time, "sleep", finish)
    res = invoke("jobs", "follow", job.id, "--interval", "0.05")
    assert res.exit_code == 0, res.output
    assert "phase: evaluating 3/6" in res.output
    assert "ft-phase-abc" in res.output

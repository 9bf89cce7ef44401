"""OpenAI's job fields that were empty, through the `openai` SDK, on a real training run of
the tiny ChatGLM3 fixture (CPU) whose progress goes to the API's store as a worker's does:
checkpoints with metrics whose fine_tuned_model_checkpoint chat accepts, `metrics` events
with step/loss/tokens per second, estimated_finish while running."""
from __future__ import annotations

import time
import uuid
from pathlib import Path

import openai
import pytest
from fastapi.testclient import TestClient
from openai import OpenAI

from service.api.app import create_app
from service.core.config import Settings
from service.core.domain import JobProgress, JobStatus, TrainingSpec

from .conftest import KEY_A, KEY_B, REDIS_URL

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "chatglm3-tiny"
pytestmark = pytest.mark.slow  # the engine and a short training run on the tiny model


def sdk(client, key=KEY_A) -> OpenAI:
    return OpenAI(api_key=key, base_url=str(client.base_url) + "/v1", http_client=client, max_retries=0)


@pytest.fixture(scope="module")
def served(tmp_path_factory, redis_client):
    settings = Settings(data_dir=tmp_path_factory.mktemp("ckpt"), redis_url=REDIS_URL,
                        task_queue=f"tuneserve-apitest-ckpt-{uuid.uuid4().hex[:12]}",
                        api_keys=f"{KEY_A}:alice,{KEY_B}:bob", engine_enabled=True, base_model=str(FIXTURE),
                        load_in_4bit=False, device="cpu", max_batch_size=2, max_seq_len=128,
                        adapter_gpu_budget_bytes=1 << 20)
    with TestClient(create_app(settings)) as client:
        assert client.get("/readyz").json()["checks"]["engine"] == "ready"
        yield client, settings


def _conversations(n: int, offset: int = 0) -> list[list[dict]]:
    return [[{"role": "user", "content": f"类型#裙*颜色#{i}"}, {"role": "assistant", "content": f"一条第{i}号的裙子"}]
            for i in range(offset, offset + n)]


@pytest.fixture(scope="module")
def trained_job(served):
    """4 steps, a checkpoint (with a validation loss) at step 2, run as the worker runs it."""
    from workers.tasks import StoreProgress
    from workers.training import TrainingRun, run_training

    client, settings = served
    store = client.app.state.tuneserve.store
    spec = TrainingSpec(max_steps=4, batch_size=2, checkpoint_steps=2, eval_steps=2, eval_max_samples=0,
                        max_source_length=32, max_target_length=32, lora_dropout=0.0, learning_rate=5e-2)
    job = store.create_job(tenant="alice", model=client.app.state.tuneserve.base_model_name, spec=spec)
    store.transition(job.id, JobStatus.running, worker_id="test-worker")
    run_training(TrainingRun(job_id=job.id, tenant="alice", base_model_ref=str(FIXTURE), spec=spec,
                             train_conversations=_conversations(8), validation_conversations=_conversations(2, 50),
                             work_dir=settings.jobs_dir / job.id, device="cpu",
                             models_cache_dir=settings.models_dir), StoreProgress(store, job.id))
    return job.id


def test_checkpoints_carry_metrics_and_chat_accepts_their_model_id(served, trained_job):
    client, _settings = served
    oa = sdk(client)
    [ckpt] = list(oa.fine_tuning.jobs.checkpoints.list(trained_job))
    assert ckpt.step_number == 2 and ckpt.fine_tuned_model_checkpoint == f"{trained_job}:step-2"
    metrics = {e.data["step"]: e.data for e in oa.fine_tuning.jobs.list_events(trained_job, limit=100)
               if e.type == "metrics" and e.data and "tokens_per_second" in e.data}
    assert ckpt.metrics.step == 2
    assert ckpt.metrics.train_loss == pytest.approx(metrics[2]["loss"], rel=1e-5)
    evals = [e.data["eval_loss"] for e in oa.fine_tuning.jobs.list_events(trained_job, limit=100)
             if e.data and e.data.get("step") == 2 and "eval_loss" in e.data]
    assert evals and ckpt.metrics.valid_loss == pytest.approx(evals[0], rel=1e-5)

    reply = oa.chat.completions.create(model=ckpt.fine_tuned_model_checkpoint, temperature=0, max_tokens=4,
                                       messages=[{"role": "user", "content": "类型#裙*颜色#3"}])
    assert reply.model == ckpt.fine_tuned_model_checkpoint and reply.usage.completion_tokens >= 1
    # The checkpoint is this tenant's only; a step that was never saved does not exist.
    for key, model in ((KEY_B, ckpt.fine_tuned_model_checkpoint), (KEY_A, f"{trained_job}:step-3")):
        with pytest.raises(openai.NotFoundError):
            sdk(client, key).chat.completions.create(model=model, max_tokens=2,
                                                     messages=[{"role": "user", "content": "hi"}])


def test_metrics_events_carry_step_loss_and_tokens_per_second(served, trained_job):
    oa = sdk(client=served[0])
    steps = [e.data for e in oa.fine_tuning.jobs.list_events(trained_job, limit=100)
             if e.type == "metrics" and e.data and "tokens_per_second" in e.data]
    assert sorted(d["step"] for d in steps) == [1, 2, 3, 4]
    for d in steps:
        assert d["loss"] > 0 and d["tokens_per_second"] > 0 and d["label_tokens_per_second"] > 0


def test_estimated_finish_while_running_from_the_eta(served):
    client, _settings = served
    store = client.app.state.tuneserve.store
    job = store.create_job(tenant="alice", model="m", spec=TrainingSpec(max_steps=10))
    oa = sdk(client)
    assert oa.fine_tuning.jobs.retrieve(job.id).estimated_finish is None  # queued: no estimate yet
    store.transition(job.id, JobStatus.running, worker_id="w")
    store.update_progress(job.id, JobProgress(step=3, total_steps=10, phase="evaluating", eta_seconds=120))
    t0 = time.time()
    finish = oa.fine_tuning.jobs.retrieve(job.id).estimated_finish
    t1 = time.time()
    assert int(t0 + 120) <= finish <= t1 + 120
    store.transition(job.id, JobStatus.cancelled)
    assert oa.fine_tuning.jobs.retrieve(job.id).estimated_finish is None

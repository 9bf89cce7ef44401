"""Issue 2: the same whole-system flow driven by the official `openai` package over real HTTP:
OpenAI(base_url=.../v1) -> files.create -> fine_tuning.jobs.create / retrieve / list_events
while a real worker trains -> chat.completions.create with the adapter, with and without
stream, differing from the base model. Issue 14: a webhook endpoint registered first gets the
job's `fine_tuning.job.succeeded`, verified by the SDK."""
from __future__ import annotations

import io
import time

import openai
import pytest
from e2e_harness import KEY_A, KEY_B, jsonl_bytes, sample_rows, wait_for
from openai import OpenAI
from webhook_receiver import Receiver

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

JOB_TIMEOUT = 300
PROMPT = "类型#裙*颜色#红色*风格#复古"


def test_openai_sdk_drives_the_whole_flow(deployment):
    with Receiver() as rx:
        _whole_flow(deployment, rx)


def _whole_flow(deployment, rx):
    oa = OpenAI(base_url=f"{deployment.url}/v1", api_key=KEY_A, max_retries=0, timeout=120)
    hook = oa.webhooks.create(event_types=["fine_tuning.job.succeeded"], name="e2e", url=rx.url)
    data = jsonl_bytes(sample_rows(48))
    f = oa.files.create(file=("sdk-train.jsonl", io.BytesIO(data)), purpose="fine-tune")
    assert f.id.startswith("file-") and f.bytes == len(data) and f.purpose == "fine-tune"
    assert oa.files.retrieve(f.id).filename == "sdk-train.jsonl"

    job = oa.fine_tuning.jobs.create(
        model=deployment.base_model, training_file=f.id, suffix="sdk", seed=11,
        hyperparameters={"n_epochs": 1, "batch_size": 4},
        # Our extras beside OpenAI's keys (the SDK sends extra_body as is).
        extra_body={"hyperparameters": {"batch_size": 4, "max_steps": 20, "learning_rate": 2e-2,
                                        "lr_scheduler": "constant", "max_source_length": 48,
                                        "max_target_length": 48, "eval_max_samples": 0,
                                        "checkpoint_steps": 1000}})
    assert job.id.startswith("ftjob-") and job.seed == 11 and job.model == deployment.base_model
    assert job.model_extra["spec"]["max_steps"] == 20

    t0 = time.monotonic()

    def finished():
        j = oa.fine_tuning.jobs.retrieve(job.id)
        assert j.status not in ("failed", "cancelled"), (j.status, j.error, deployment.system.logs())
        return j if j.status == "succeeded" else None
    done = wait_for(finished, JOB_TIMEOUT, f"{job.id} to succeed", interval=0.5, diagnostics=deployment.system.logs)
    print(f"\nSDK job succeeded in {time.monotonic() - t0:.1f} s")
    assert done.fine_tuned_model and done.fine_tuned_model.startswith("ft-sdk-")
    assert done.finished_at and done.trained_tokens and done.error is None
    (results_id,) = done.result_files  # the metrics CSV, one row per step
    lines = oa.files.content(results_id).text.splitlines()
    assert lines[0] == "step,train_loss,train_mean_token_accuracy,valid_loss,valid_mean_token_accuracy"
    assert [int(line.split(",")[0]) for line in lines[1:]] == list(range(1, 21))

    # The webhook came without polling (sent by a background sender, so it may trail the status).
    def delivered():
        events = [oa.webhooks.unwrap(r.body, r.headers, secret=hook.signing_secret) for r in rx.received()]
        return [e for e in events if e.data.id == job.id]
    events = wait_for(delivered, 60, "the succeeded webhook", diagnostics=deployment.system.logs)
    # at least once: a repeat would carry the same event id
    assert {(e.id, e.type) for e in events} == {(events[0].id, "fine_tuning.job.succeeded")}
    oa.webhooks.delete(hook.id)

    # list_events auto-paginates (newest first); the metrics events carry the loss curve.
    events = list(oa.fine_tuning.jobs.list_events(job.id, limit=5))
    assert len(events) > 20 and all(e.object == "fine_tuning.job.event" for e in events)
    losses = {int(e.data["step"]): e.data["loss"] for e in events
              if e.type == "metrics" and e.data and "total_steps" in e.data}
    assert sorted(losses) == list(range(1, 21))
    assert sum(losses[s] for s in range(16, 21)) < sum(losses[s] for s in range(1, 6)), losses
    assert done.fine_tuned_model in [m.id for m in oa.models.list()]
    assert any(j.id == job.id for j in oa.fine_tuning.jobs.list(limit=2))

    # Chat: adapter vs base, non-stream and stream.
    def ask(model: str) -> str:
        r = oa.chat.completions.create(model=model, messages=[{"role": "user", "content": PROMPT}],
                                       max_tokens=16, temperature=0)
        assert r.object == "chat.completion" and r.choices[0].finish_reason in ("stop", "length")
        assert r.usage.completion_tokens > 0 and r.model == model
        return r.choices[0].message.content

    base, tuned = ask(deployment.base_model), ask(done.fine_tuned_model)
    assert tuned and base != tuned, (base, tuned)
    stream = oa.chat.completions.create(model=done.fine_tuned_model, max_tokens=16, temperature=0, stream=True,
                                        messages=[{"role": "user", "content": PROMPT}],
                                        stream_options={"include_usage": True})
    chunks = list(stream)
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == tuned
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0

    # Typed errors through the SDK against the live server.
    other = OpenAI(base_url=f"{deployment.url}/v1", api_key=KEY_B, max_retries=0)
    with pytest.raises(openai.NotFoundError):
        other.fine_tuning.jobs.retrieve(job.id)
    with pytest.raises(openai.NotFoundError):
        other.chat.completions.create(model=done.fine_tuned_model, messages=[{"role": "user", "content": "x"}])
    with pytest.raises(openai.AuthenticationError):
        OpenAI(base_url=f"{deployment.url}/v1", api_key="wrong-key", max_retries=0).models.list()

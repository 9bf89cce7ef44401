"""The official `openai` package against our routes (its own request building, response
parsing and pagination), with the app behind Starlette's TestClient as its HTTP client."""
from __future__ import annotations

import io

import openai
import pytest
from openai import OpenAI

from .conftest import BASE, GOOD_ROWS, KEY_A, KEY_B, jsonl


def sdk(client, key=KEY_A) -> OpenAI:
    return OpenAI(api_key=key, base_url=str(client.base_url) + "/v1", http_client=client, max_retries=0)


def test_files_and_jobs_through_the_sdk(client, queue_len):
    oa = sdk(client)
    f = oa.files.create(file=("train.jsonl", io.BytesIO(jsonl(GOOD_ROWS))), purpose="fine-tune")
    assert f.id.startswith("file-") and f.purpose == "fine-tune" and f.bytes == len(jsonl(GOOD_ROWS))
    assert oa.files.retrieve(f.id).filename == "train.jsonl"
    assert [x.id for x in oa.files.list()] == [f.id]

    job = oa.fine_tuning.jobs.create(model=BASE, training_file=f.id, suffix="ads", seed=3,
                                     hyperparameters={"n_epochs": 1, "batch_size": 2},
                                     extra_body={"hyperparameters": {"n_epochs": 1, "batch_size": 2,
                                                                     "max_steps": 5, "lora_r": 4}})
    assert job.status == "queued" and job.seed == 3 and job.hyperparameters.n_epochs == 1
    assert job.model_extra["spec"]["max_steps"] == 5 and job.model_extra["progress"]["step"] == 0
    assert queue_len() == 1
    job2 = oa.fine_tuning.jobs.create(model=BASE, training_file=f.id,
                                      method={"type": "supervised",
                                              "supervised": {"hyperparameters": {"n_epochs": 2}}})
    assert job2.hyperparameters.n_epochs == 2

    got = oa.fine_tuning.jobs.retrieve(job.id)
    assert got.id == job.id and got.training_file == f.id
    # auto-pagination follows `after` with has_more
    assert [j.id for j in oa.fine_tuning.jobs.list(limit=1)] == [job2.id, job.id]

    store = client.app.state.tuneserve.store
    for i in range(3):
        store.add_event(job.id, f"step {i}", type="metrics", data={"step": i, "loss": 1.0 / (i + 1)})
    events = list(oa.fine_tuning.jobs.list_events(job.id, limit=2))
    assert [e.message for e in events] == ["step 2", "step 1", "step 0"]
    assert events[0].object == "fine_tuning.job.event" and events[0].data["loss"] == pytest.approx(1 / 3)
    assert list(oa.fine_tuning.jobs.checkpoints.list(job.id)) == []

    cancelled = oa.fine_tuning.jobs.cancel(job.id)
    assert cancelled.status == "cancelled"
    assert [m.id for m in oa.models.list()] == [BASE]
    with pytest.raises(openai.ConflictError):  # job2 still uses it
        oa.files.delete(f.id)
    oa.fine_tuning.jobs.cancel(job2.id)
    assert oa.files.delete(f.id).deleted is True


def test_sdk_raises_typed_errors(client):
    oa = sdk(client)
    with pytest.raises(openai.AuthenticationError):
        sdk(client, key="wrong").files.list()
    with pytest.raises(openai.NotFoundError) as e:
        oa.fine_tuning.jobs.retrieve("ftjob-nope")
    assert e.value.body["code"] == "not_found"
    with pytest.raises(openai.BadRequestError) as e:
        oa.fine_tuning.jobs.create(model="gpt-4o-mini", training_file="file-nope")
    assert {d["param"] for d in e.value.body["details"]} == {"model", "training_file"}
    with pytest.raises(openai.BadRequestError) as e:
        oa.files.create(file=("bad.jsonl", io.BytesIO(b'{"content": "x"}\n')), purpose="fine-tune")
    assert "line 1" in e.value.message and e.value.body["details"][0]["field"] == "summary"
    f = oa.files.create(file=("t.jsonl", io.BytesIO(jsonl(GOOD_ROWS))), purpose="fine-tune")
    oa.fine_tuning.jobs.create(model=BASE, training_file=f.id)
    with pytest.raises(openai.ConflictError):
        oa.files.delete(f.id)
    # another tenant sees nothing of it
    with pytest.raises(openai.NotFoundError):
        sdk(client, key=KEY_B).files.retrieve(f.id)

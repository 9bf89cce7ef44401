"""A succeeded job's `result_files` (the metrics CSV) read back through the `openai` SDK: the
job lists it, files.content returns it, and it is the tenant's file with purpose
fine-tune-results (another tenant's key answers 404)."""
from __future__ import annotations

import openai
import pytest
from openai import OpenAI

from service.core.domain import JobStatus, TrainingSpec
from service.core.results import write_results_file

from .conftest import KEY_A, KEY_B


def sdk(client, key=KEY_A) -> OpenAI:
    return OpenAI(api_key=key, base_url=str(client.base_url) + "/v1", http_client=client, max_retries=0)


def test_result_file_through_the_sdk(client, settings):
    store = client.app.state.tuneserve.store
    job = store.create_job(tenant="alice", model="m", spec=TrainingSpec(max_steps=2))
    store.transition(job.id, JobStatus.running)
    for step, loss in ((1, 2.0), (2, 1.5)):
        store.add_event(job.id, f"step {step}", type="metrics", data={"step": step, "loss": loss})
    info = write_results_file(store, settings.files_dir, store.get_job(job.id))  # what the worker does
    store.transition(job.id, JobStatus.succeeded, fine_tuned_model="ft-x", result={"result_files": [info.id]})

    oa = sdk(client)
    done = oa.fine_tuning.jobs.retrieve(job.id)
    assert done.result_files == [info.id]
    text = oa.files.content(info.id).text
    assert text.splitlines() == ["step,train_loss,train_mean_token_accuracy,valid_loss,valid_mean_token_accuracy",
                                 "1,2.0,,,", "2,1.5,,,"]
    f = oa.files.retrieve(info.id)
    assert f.purpose == "fine-tune-results" and f.filename == "step_metrics.csv" and f.bytes == len(text.encode())
    assert [x.id for x in oa.files.list(purpose="fine-tune-results")] == [info.id]
    with pytest.raises(openai.NotFoundError):
        sdk(client, key=KEY_B).files.content(info.id)
    with pytest.raises(openai.BadRequestError) as e:  # results are not training data
        oa.fine_tuning.jobs.create(model="tuneserve-demo-chatglm3-tiny", training_file=info.id)
    assert e.value.body["param"] == "training_file"

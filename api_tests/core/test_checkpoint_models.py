"""service.core.checkpoints.CheckpointModels: job checkpoints as read-only adapters named by
their fine_tuned_model_checkpoint, for the owning tenant only; every other name is the
registry's."""
from __future__ import annotations

import json
from datetime import datetime, timezone

import pytest

from service.core.checkpoints import CheckpointModels, checkpoint_model_id, parse_checkpoint_model
from service.core.domain import Job, JobStatus, TrainingSpec
from service.core.errors import NotFound
from service.core.registry import sha256_file

JOB_ID = "ftjob-0123456789abcdef01234567"


class _Registry:
    def resolve(self, tenant, name, version=None):
        return ("registry", tenant, name, version)

    def latest_version(self, tenant, name):
        return 7

    def list(self, tenant):
        return ["listed"]


def _job(tenant: str = "alice") -> Job:
    return Job(id=JOB_ID, tenant=tenant, model="tiny-base", status=JobStatus.running, spec=TrainingSpec(),
               created_at=datetime.now(timezone.utc))


@pytest.fixture
def models(tmp_path):
    step = tmp_path / "jobs" / JOB_ID / "checkpoints" / "step-20"
    step.mkdir(parents=True)
    (step / "adapter_config.json").write_text(json.dumps({"r": 4, "lora_alpha": 8, "target_modules": ["v_proj", "q_proj"]}))
    (step / "adapter_model.safetensors").write_bytes(b"weights")
    (step / "state.json").write_text(json.dumps({"step": 20, "loss": 1.25, "eval_loss": 1.5, "created_at": 1_700_000_000,
                                                 "resume_key": {"base": "f" * 64}}))
    jobs = {JOB_ID: _job()}

    def get_job(job_id):
        if job_id not in jobs:
            raise NotFound("no", param="job_id")
        return jobs[job_id]
    return CheckpointModels(_Registry(), tmp_path / "jobs", get_job), step


def test_ids_round_trip_and_other_names_are_not_checkpoints():
    assert parse_checkpoint_model(checkpoint_model_id(JOB_ID, 20)) == (JOB_ID, 20)
    for name in ("ft-ads-1", f"{JOB_ID}:step-", f"{JOB_ID}:step-x", f"../{JOB_ID}:step-1", ""):
        assert parse_checkpoint_model(name) is None


def test_a_checkpoint_resolves_for_its_tenant_with_hashes_and_metrics(models):
    cm, step = models
    name = checkpoint_model_id(JOB_ID, 20)
    path, m = cm.resolve("alice", name)
    assert path == step and m.name == name and m.version == 1 and m.job_id == JOB_ID
    assert m.base_model == "tiny-base" and m.base_model_fingerprint == "f" * 64
    assert m.target_modules == ["q_proj", "v_proj"] and m.r == 4 and m.lora_alpha == 8.0
    assert m.files == {f: sha256_file(step / f) for f in ("adapter_config.json", "adapter_model.safetensors")}
    assert m.metrics == {"step": 20, "train_loss": 1.25, "valid_loss": 1.5}
    assert cm.latest_version("alice", name) == 1


def test_another_tenant_a_missing_step_or_version_is_not_found(models):
    cm, _ = models
    name = checkpoint_model_id(JOB_ID, 20)
    for tenant, model, version in (("bob", name, None), ("alice", checkpoint_model_id(JOB_ID, 30), None),
                                   ("alice", name, 2), ("alice", checkpoint_model_id("ftjob-nope", 20), None)):
        with pytest.raises(NotFound):
            cm.resolve(tenant, model, version)
    assert cm.latest_version("bob", name) is None


def test_every_other_name_is_the_registry_s(models):
    cm, _ = models
    assert cm.resolve("alice", "ft-ads-1") == ("registry", "alice", "ft-ads-1", None)
    assert cm.latest_version("alice", "ft-ads-1") == 7 and cm.list("alice") == ["listed"]

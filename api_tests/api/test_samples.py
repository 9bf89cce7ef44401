"""Evaluation samples: job views and adapter lists carry the scores only; the before/after rows
have their own routes (GET /v1/fine_tuning/jobs/{id}/samples, GET /v1/adapters/{name}/samples)."""
from __future__ import annotations

import json

from service.core.domain import JobStatus, TrainingSpec
from service.core.registry import AdapterRegistry
from service.core.store import Store

from .conftest import AUTH_A, AUTH_B, BASE, assert_error

N_ROWS = 40


def _quality() -> dict:
    rows = [{"prompt": f"类型#裙*颜色#红色*{i}", "reference": f"一条红色的裙子 {i}",
             "base": f"base reply {i} " * 20, "adapter": f"adapter reply {i} " * 20} for i in range(N_ROWS)]
    scores = {"bleu-4": 1.25, "rouge-1": 10.5, "rouge-2": 2.0, "rouge-l": 8.0, "n_samples": N_ROWS}
    return {"split": "validation", "n_samples": N_ROWS, "base": scores,
            "adapter": dict(scores, **{"bleu-4": 7.5}), "before_after": rows}


def _metrics() -> dict:
    return {"train_loss": 1.5, "eval_loss": 1.75, "quality": _quality()}


def _succeeded_job(settings) -> str:
    store = Store(settings.resolved_database_url)
    try:
        job = store.create_job(tenant="alice", model=BASE, spec=TrainingSpec(max_steps=2))
        store.transition(job.id, JobStatus.running, worker_id="w")
        store.transition(job.id, JobStatus.succeeded, fine_tuned_model="ft-x",
                         result={"metrics": _metrics(), "training": {"steps": 2}})
        return job.id
    finally:
        store.close()


def _publish(settings, tmp_path, name: str = "ft-samples") -> None:
    src = tmp_path / "src"
    src.mkdir(exist_ok=True)
    (src / "adapter_config.json").write_text(json.dumps({"r": 4, "lora_alpha": 8, "target_modules": ["q_proj"]}))
    (src / "adapter_model.safetensors").write_bytes(b"weights")
    AdapterRegistry(settings.resolved_registry_dir).publish(
        tenant="alice", name=name, source_dir=src,
        manifest={"base_model": BASE, "target_modules": ["q_proj"], "r": 4, "lora_alpha": 8.0,
                  "job_id": "ftjob-abc", "metrics": _metrics()})


def test_job_views_carry_scores_and_the_samples_route_the_rows(client, settings):
    job_id = _succeeded_job(settings)
    for body in (client.get(f"/v1/fine_tuning/jobs/{job_id}", headers=AUTH_A).json(),
                 client.get("/v1/fine_tuning/jobs", headers=AUTH_A).json()["data"][0]):
        quality = body["result"]["metrics"]["quality"]
        assert "before_after" not in quality
        assert quality["adapter"]["bleu-4"] == 7.5 and quality["n_samples"] == N_ROWS
        assert body["result"]["metrics"]["eval_loss"] == 1.75 and body["result"]["training"] == {"steps": 2}

    page = client.get(f"/v1/fine_tuning/jobs/{job_id}/samples", headers=AUTH_A).json()
    assert page["object"] == "list" and page["split"] == "validation" and page["n_samples"] == N_ROWS
    assert [r["prompt"] for r in page["data"]] == [f"类型#裙*颜色#红色*{i}" for i in range(N_ROWS)]
    assert page["data"][3]["adapter"].startswith("adapter reply 3") and page["has_more"] is False
    first = client.get(f"/v1/fine_tuning/jobs/{job_id}/samples", headers=AUTH_A, params={"limit": 5}).json()
    assert len(first["data"]) == 5 and first["has_more"] is True

    assert_error(client.get(f"/v1/fine_tuning/jobs/{job_id}/samples", headers=AUTH_B), 404)


def test_samples_of_a_job_that_has_not_evaluated_are_empty(client, settings):
    store = Store(settings.resolved_database_url)
    job = store.create_job(tenant="alice", model=BASE, spec=TrainingSpec(max_steps=2))
    store.close()
    page = client.get(f"/v1/fine_tuning/jobs/{job.id}/samples", headers=AUTH_A).json()
    assert page["data"] == [] and page["n_samples"] == 0 and page["has_more"] is False


def test_adapter_list_is_a_summary_and_samples_have_their_route(client, settings, tmp_path):
    _publish(settings, tmp_path)
    listed = client.get("/v1/adapters", headers=AUTH_A)
    [adapter] = listed.json()["data"]
    assert "before_after" not in adapter["metrics"]["quality"]
    assert adapter["metrics"]["quality"]["adapter"]["bleu-4"] == 7.5
    # The rows were most of the bytes (each ~400 characters here, 40 of them).
    assert len(listed.content) < 4_000, len(listed.content)
    assert "before_after" not in client.get("/v1/adapters/ft-samples", headers=AUTH_A).json()["metrics"]["quality"]

    page = client.get("/v1/adapters/ft-samples/samples", headers=AUTH_A).json()
    assert page["n_samples"] == N_ROWS and len(page["data"]) == N_ROWS
    assert page["data"][0] == {"prompt": "类型#裙*颜色#红色*0", "reference": "一条红色的裙子 0",
                               "base": "base reply 0 " * 20, "adapter": "adapter reply 0 " * 20}
    assert client.get("/v1/adapters/ft-samples/samples", headers=AUTH_A,
                      params={"version": 1}).json()["n_samples"] == N_ROWS
    assert_error(client.get("/v1/adapters/ft-samples/samples", headers=AUTH_B), 404)
    assert_error(client.get("/v1/adapters/ft-samples/samples", headers=AUTH_A, params={"version": 9}), 404)


def test_adapters_name_the_base_by_its_public_id_not_a_host_path(client, settings, tmp_path):
    """A manifest written before the worker recorded public ids holds the base's directory."""
    base_dir = tmp_path / "models" / "chatglm3-tiny-local"
    base_dir.mkdir(parents=True)
    src = tmp_path / "src-legacy"
    src.mkdir()
    (src / "adapter_config.json").write_text(json.dumps({"r": 4, "lora_alpha": 8, "target_modules": ["q_proj"]}))
    (src / "adapter_model.safetensors").write_bytes(b"weights")
    AdapterRegistry(settings.resolved_registry_dir).publish(
        tenant="alice", name="ft-legacy", source_dir=src,
        manifest={"base_model": str(base_dir), "target_modules": ["q_proj"], "r": 4, "lora_alpha": 8.0})
    [adapter] = client.get("/v1/adapters", headers=AUTH_A).json()["data"]
    assert adapter["base_model"] == "chatglm3-tiny-local"
    assert client.get("/v1/adapters/ft-legacy", headers=AUTH_A).json()["base_model"] == "chatglm3-tiny-local"
    models = client.get("/v1/models", headers=AUTH_A).json()["data"]
    assert [m["base_model"] for m in models if m["id"] == "ft-legacy"] == ["chatglm3-tiny-local"]

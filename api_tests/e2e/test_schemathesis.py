"""Issue 6: schemathesis against the live deployment's /openapi.json (uvicorn serving
create_app with the engine ON on the tiny demo model, so chat answers for real and no 503 has
to be excused), authenticated with a bearer key. Bounded and reproducible: a fixed number of
examples per operation and generation mode, derandomized, no example database. Checked on every
answer: no 5xx; the status is one the operation documents (status_code_conformance); and a
request the schema allows (positive mode) is not refused with a 4xx other than the auth and
not-found answers schemathesis accepts for valid data (positive_data_acceptance). Every failure of
an operation is collected and reported together (no shrinking: the run stays bounded)."""
from __future__ import annotations

import time

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from schemathesis import GenerationMode
from schemathesis.core.failures import FailureGroup
from schemathesis.specs.openapi.checks import positive_data_acceptance, status_code_conformance

from e2e_harness import AUTH_A

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

MAX_EXAMPLES = 10


def _cases() -> list[tuple[str, GenerationMode]]:
    """(operation, mode) pairs, known at collection time from the same app code (no lifespan
    runs). Negative mode only where there is something to break (parameters or a body)."""
    from service.api.app import create_app
    from service.core.config import Settings
    spec = create_app(Settings(engine_enabled=False)).openapi()
    out = []
    for path, item in spec["paths"].items():
        for method, op in item.items():
            if method not in ("get", "post", "put", "patch", "delete"):
                continue
            label = f"{method.upper()} {path}"
            out.append((label, GenerationMode.POSITIVE))
            if op.get("parameters") or op.get("requestBody"):
                out.append((label, GenerationMode.NEGATIVE))
    return sorted(out)


@pytest.fixture(scope="module")
def live_schema(deployment):
    config = schemathesis.Config.from_dict({"cache": {"enabled": False}})  # write nothing into the repo
    return schemathesis.openapi.from_url(f"{deployment.url}/openapi.json", config=config, timeout=30)


@pytest.fixture(scope="module")
def real_ids(deployment) -> dict[str, str]:
    """Ids of real objects of tenant A and a dataset file inside the server's dataset directory:
    valid bodies name them, so the generated values of every other field reach the validation
    behind them (a random file id is only a 400 about the id)."""
    from e2e_harness import jsonl_bytes, sample_rows
    c = deployment.client()
    try:
        file_id = c.upload(jsonl_bytes(sample_rows(4)))["id"]
    finally:
        c.close()
    dataset = deployment.system.data_dir / "datasets" / "fuzz.jsonl"
    dataset.parent.mkdir(parents=True, exist_ok=True)
    dataset.write_bytes(jsonl_bytes(sample_rows(4)))
    return {"file": file_id, "dataset": str(dataset)}


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)  # integers may come as 366.0


def _point_at_real_objects(label: str, body, deployment, ids: dict[str, str]) -> None:
    if not isinstance(body, dict):
        return
    if label in ("POST /v1/chat/completions", "POST /chat", "POST /v1/fine_tuning/jobs") and "model" in body:
        # Random model names all answer 404 (or 400 for a job): the base model makes the engine /
        # the job validation see the generated parameters themselves.
        body["model"] = deployment.base_model
    if label in ("POST /v1/chat/completions", "POST /chat"):
        # The context limit counts tokens (a 400 context_length_exceeded past it), which no
        # schema can state: keep prompt and answer well inside the test server's 256.
        for key in ("max_tokens", "max_completion_tokens", "max_new_tokens"):
            if isinstance(body.get(key), (int, float)) and not isinstance(body.get(key), bool):
                body[key] = min(int(body[key]), 8)
        turns = body.get("messages") if isinstance(body.get("messages"), list) else body.get("history")
        if isinstance(turns, list):
            del turns[4:]
            for turn in turns:
                if isinstance(turn, list):  # /chat's [query, answer] pairs
                    turn[:] = [t[:16] if isinstance(t, str) else t for t in turn]
                elif isinstance(turn, dict) and isinstance(turn.get("content"), str):
                    turn["content"] = turn["content"][:16]
                elif isinstance(turn, dict) and isinstance(turn.get("content"), list):
                    del turn["content"][2:]
                    for part in turn["content"]:
                        if isinstance(part, dict) and isinstance(part.get("text"), str):
                            part["text"] = part["text"][:8]
        for key in ("message", "prompt", "query", "system"):
            if isinstance(body.get(key), str):
                body[key] = body[key][:16]
    if label == "POST /v1/fine_tuning/jobs":
        # Which files and dataset paths exist is the server's state, not the schema's.
        for key in ("training_file", "validation_file"):
            if body.get(key):
                body[key] = ids["file"]
        for key in ("training_dataset", "validation_dataset"):
            if isinstance(body.get(key), dict):
                body[key]["path"] = ids["dataset"]
        # One rule relates two fields, which JSON Schema cannot state (the spec's description does).
        method = body.get("method") if isinstance(body.get("method"), dict) else {}
        supervised = method.get("supervised") if isinstance(method.get("supervised"), dict) else {}
        for hyper in (body.get("hyperparameters"), supervised.get("hyperparameters")):
            if isinstance(hyper, dict) and _is_number(hyper.get("micro_batch_size")):
                batch = hyper["batch_size"] if _is_number(hyper.get("batch_size")) else 16  # "auto", absent
                hyper["micro_batch_size"] = min(hyper["micro_batch_size"], batch)
    if label == "POST /v1/files" and "file" in body:
        # The schema says binary; that every row is valid JSONL is checked past it.
        from e2e_harness import jsonl_bytes, sample_rows
        body["file"] = jsonl_bytes(sample_rows(2))


def _clean_up(label: str, response, deployment, created_jobs: list[str]) -> None:
    """Undo what an accepted request created, so the fuzz leaves no job training on the shared
    worker and no endpoint receiving its events."""
    if response.status_code != 200 or label not in ("POST /v1/fine_tuning/jobs", "POST /v1/webhook_endpoints"):
        return
    c = deployment.client()
    try:
        if label == "POST /v1/fine_tuning/jobs":
            created_jobs.append(response.json()["id"])
            c.http.post(f"/v1/fine_tuning/jobs/{created_jobs[-1]}/cancel")
        else:
            c.http.delete(f"/v1/webhook_endpoints/{response.json()['id']}")
    finally:
        c.close()


def _wait_until_the_worker_is_done_with(deployment, job_ids: list[str]) -> None:
    """The worker may have claimed a job before its cancel: let it stop, and take every message
    of these jobs off the broker, so nothing of this test happens during the next one."""
    from e2e_harness import FINAL, wait_for

    c = deployment.client()

    def idle() -> bool:
        if any(c.job(j)["status"] not in FINAL for j in job_ids):
            return False
        r = deployment.redis()
        try:
            queued = r.llen(deployment.system.queue)
        finally:
            r.close()
        log = deployment.worker.log()
        return queued == 0 and log.count("] received") == log.count('"logger": "celery.app.trace"')
    try:
        wait_for(idle, 180, "the worker to finish the fuzzed jobs", interval=0.5,
                 diagnostics=lambda: deployment.worker.log()[-3000:])
    finally:
        c.close()


@pytest.mark.parametrize(("label", "mode"), _cases(), ids=[f"{lbl} {m}" for lbl, m in _cases()])
def test_spec_conformance(live_schema, deployment, real_ids, label, mode):
    operation = live_schema.find_operation_by_label(label)
    assert operation is not None, f"{label} is not in the live /openapi.json"
    seen: list[int] = []
    failures: list[str] = []
    created_jobs: list[str] = []
    checks = [status_code_conformance] + ([positive_data_acceptance] if mode is GenerationMode.POSITIVE else [])
    t0 = time.monotonic()

    @settings(max_examples=MAX_EXAMPLES, derandomize=True, deadline=None, database=None,
              phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
    @given(case=operation.as_strategy(generation_mode=mode))
    def run(case):
        if mode is GenerationMode.POSITIVE:
            _point_at_real_objects(label, case.body, deployment, real_ids)
        response = case.call(base_url=deployment.url, headers=dict(AUTH_A), timeout=60)
        seen.append(response.status_code)
        _clean_up(label, response, deployment, created_jobs)
        curl = case.as_curl_command(headers=dict(AUTH_A))
        if response.status_code >= 500:
            failures.append(f"{response.status_code}: {response.text[:500]}\n{curl}")
            return
        try:
            case.validate_response(response, checks=checks)
        except FailureGroup as exc:
            failures.append(f"{response.status_code} {response.text[:300]}\n"
                            + "\n".join(f"  {type(f).__name__}: {f.title}" for f in exc.exceptions) + f"\n{curl}")

    run()
    _wait_until_the_worker_is_done_with(deployment, created_jobs)
    assert deployment.api.alive()
    print(f"\n{label} [{mode}]: {len(seen)} requests, statuses {sorted(set(seen))}, "
          f"{time.monotonic() - t0:.1f} s")
    assert not failures, f"{label} [{mode}]: {len(failures)} of {len(seen)} answers fail:\n" + "\n\n".join(failures)

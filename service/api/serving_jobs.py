"""Fine-tuning job logic between the thin routes and the store: the whole request checked at
once (model, training sources, dataset roots, hyperparameters, suffix, metadata), then the row
committed and its id enqueued, or nothing left behind. No torch, no training code."""
from __future__ import annotations

import hashlib
import json
import logging
from typing import Any

from service.api.queue import JobQueue
from service.api.schemas import JobCreate
from service.core import ids
from service.core.config import Settings
from service.core.domain import (
    MAX_METADATA_KEY_CHARS,
    MAX_METADATA_KEYS,
    MAX_METADATA_VALUE_CHARS,
    DatasetSource,
    Job,
    TrainingSpec,
    suffix_problem,
)
from service.core.errors import InvalidInput, NotFound, ServiceUnavailable, TuneserveError
from service.core.store import Store

log = logging.getLogger("tuneserve.api.jobs")

Problems = list[dict[str, Any]]
MAX_IDEMPOTENCY_KEY = 255


def _check_source(src: DatasetSource, settings: Settings, param: str, problems: Problems) -> None:
    """A `datasets` source: a hub id, or a local path resolving (with all it holds) inside the
    server's dataset roots."""
    from service.core.datasets import check_dataset_source  # pure, no torch
    try:
        check_dataset_source(src, settings.resolved_dataset_roots, param=param)
    except InvalidInput as exc:
        problems.append({"param": exc.param or param, "message": exc.message})


def _check_file(store: Store, file_id: str, tenant: str, param: str, problems: Problems) -> None:
    try:
        info = store.get_file(file_id, tenant)
    except NotFound:
        problems.append({"param": param, "message": f"no file {file_id!r}"})
        return
    if info.purpose != "fine-tune":
        problems.append({"param": param, "message": f"file {file_id!r} has purpose {info.purpose!r}, "
                                                    "not 'fine-tune'"})


def _check_sources(body: JobCreate, store: Store, settings: Settings, tenant: str, problems: Problems) -> None:
    """Exactly one training source (an uploaded file or a `datasets` source), at most one
    validation source, each one usable."""
    if body.training_file and body.training_dataset:
        problems.append({"param": "training_file", "message": "give training_file or training_dataset, not both"})
    elif not body.training_file and not body.training_dataset:
        problems.append({"param": "training_file", "message": "training_file (or training_dataset) is required"})
    if body.validation_file and body.validation_dataset:
        problems.append({"param": "validation_file",
                         "message": "give validation_file or validation_dataset, not both"})
    for param in ("training_file", "validation_file"):
        if getattr(body, param):
            _check_file(store, getattr(body, param), tenant, param, problems)
    for param in ("training_dataset", "validation_dataset"):
        if getattr(body, param):
            _check_source(getattr(body, param), settings, param, problems)


def _training_spec(body: JobCreate, problems: Problems) -> TrainingSpec | None:
    """Hyperparameters at the top level (OpenAI's deprecated place) or in
    method.supervised.hyperparameters, read by TrainingSpec; None when they have problems."""
    hyper = body.hyperparameters
    prefix = "hyperparameters"
    if body.method is not None:
        if body.method.type != "supervised":
            problems.append({"param": "method.type",
                             "message": f"only 'supervised' fine-tuning is supported (got {body.method.type!r})"})
        elif body.method.supervised is not None and body.method.supervised.hyperparameters is not None:
            if hyper is not None:
                problems.append({"param": "method.supervised.hyperparameters",
                                 "message": "give hyperparameters either at the top level or in method, not both"})
            else:
                hyper = body.method.supervised.hyperparameters
                prefix = "method.supervised.hyperparameters"
    try:
        return TrainingSpec.from_hyperparameters(hyper, seed=body.seed, param_prefix=prefix)
    except InvalidInput as exc:
        for d in exc.details or [{"param": exc.param or prefix, "message": exc.message}]:
            if d.get("param") == f"{prefix}.seed" and body.seed is not None:
                d = {**d, "param": "seed"}  # the client sent it at the top level
            problems.append(d)
        return None


def _check_extras(body: JobCreate, problems: Problems) -> None:
    """suffix, metadata, integrations."""
    if body.suffix is not None and (why := suffix_problem(body.suffix)) is not None:
        problems.append({"param": "suffix", "message": why})
    if body.metadata is not None:
        if len(body.metadata) > MAX_METADATA_KEYS:
            problems.append({"param": "metadata", "message": f"at most {MAX_METADATA_KEYS} keys"})
        for k, v in body.metadata.items():
            if len(k) > MAX_METADATA_KEY_CHARS or len(v) > MAX_METADATA_VALUE_CHARS:
                problems.append({"param": f"metadata.{k[:MAX_METADATA_KEY_CHARS]}",
                                 "message": f"keys are at most {MAX_METADATA_KEY_CHARS} characters, "
                                            f"values at most {MAX_METADATA_VALUE_CHARS}"})
    if body.integrations:
        problems.append({"param": "integrations", "message": "integrations are not supported"})


def validate_job(body: JobCreate, *, state, store: Store, settings: Settings, tenant: str) -> TrainingSpec:
    """Check the whole request; raise one InvalidInput listing every problem."""
    problems: Problems = []
    if not state.is_base_model(body.model):
        problems.append({"param": "model", "message": f"model must be this service's base model "
                                                      f"{state.base_model_name!r} (got {body.model!r})"})
    _check_sources(body, store, settings, tenant, problems)
    spec = _training_spec(body, problems)
    _check_extras(body, problems)
    if problems:
        raise InvalidInput.from_problems(problems)
    assert spec is not None
    return spec


def check_idempotency_key(key: str) -> str:
    """An Idempotency-Key is 1-255 visible ASCII characters (what a header can carry as is)."""
    if not 1 <= len(key) <= MAX_IDEMPOTENCY_KEY or not all("!" <= ch <= "~" for ch in key):
        raise InvalidInput(f"Idempotency-Key must be 1 to {MAX_IDEMPOTENCY_KEY} visible ASCII characters",
                           param="Idempotency-Key")
    return key


def request_fingerprint(body: JobCreate) -> str:
    """The request as parsed, so a retry that serializes the same body differently still matches."""
    canonical = json.dumps(body.model_dump(mode="json"), sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode()).hexdigest()


def create_job(body: JobCreate, *, state, store: Store, queue: JobQueue, settings: Settings, tenant: str,
               idempotency_key: str | None = None) -> Job:
    """Validate, commit the row, then enqueue its id (the store is the truth); a job the broker
    never got is deleted again rather than left "queued" forever. With an `idempotency_key`
    this tenant already created a job under, that job is the answer and nothing is enqueued."""
    if idempotency_key is not None:
        check_idempotency_key(idempotency_key)
    spec = validate_job(body, state=state, store=store, settings=settings, tenant=tenant)
    fields = {"model": state.base_model_name, "spec": spec,
              "training_file": body.training_file, "validation_file": body.validation_file,
              "training_dataset": body.training_dataset, "validation_dataset": body.validation_dataset,
              "suffix": body.suffix, "metadata": body.metadata}
    if idempotency_key is None:
        job = store.create_job(tenant=tenant, **fields)
    else:
        job, created = store.create_job_once(idempotency_key=idempotency_key, fingerprint=request_fingerprint(body),
                                             tenant=tenant, **fields)
        if not created:  # a retry: that request enqueued it (or rolled it back, and then its key went too)
            log.info("job create replayed for its idempotency key", extra={"job_id": job.id, "tenant": tenant})
            state.metrics.jobs_replayed.inc()
            return job
    try:
        queue.enqueue(job.id)
    except TuneserveError:
        try:
            store.delete_job(job.id)
        except Exception:  # pragma: no cover - logged; the recovery sweep re-enqueues queued rows
            log.exception("could not roll back job %s after a failed enqueue", job.id)
        state.metrics.enqueue_failures.inc()
        raise ServiceUnavailable("the training queue is unavailable; the job was not created, retry later",
                                 code="queue_unavailable") from None
    state.metrics.jobs_created.inc()
    log.info("job created and enqueued", extra={"job_id": job.id, "tenant": tenant})
    return job


def job_id_as_model_hint(store: Store, tenant: str, model: str | None) -> str | None:
    """What to tell a client who passed a fine-tuning job's id as a chat `model`: its
    fine_tuned_model, or that it has none yet. Another tenant's job reads as unknown (the same
    hint as for a made-up id), so no job's existence leaks. None for anything else."""
    if not model or not model.startswith(f"{ids.JOB_PREFIX}-"):
        return None
    try:
        job = store.get_job(model, tenant)
    except NotFound:
        return f"{model!r} looks like a fine-tuning job id: chat with the job's fine_tuned_model instead"
    if job.fine_tuned_model:
        return f"{model!r} is a fine-tuning job: chat with its fine_tuned_model {job.fine_tuned_model!r}"
    return (f"{model!r} is a fine-tuning job ({job.status.value}) and has no fine_tuned_model yet: "
            "chat with it once the job has succeeded")

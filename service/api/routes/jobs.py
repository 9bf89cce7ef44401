"""/v1/fine_tuning/jobs. Thin: validate everything, commit the row, then enqueue the id.

Nothing here imports torch or the training code: checkpoints are listed through
service.core.checkpoints, which reads their on-disk layout."""
from __future__ import annotations

import logging
from typing import Any

from fastapi import APIRouter, Query

from service.api.deps import QueueDep, SettingsDep, StateDep, StoreDep, TenantDep
from service.api.paging import page_after
from service.api.schemas import (
    CheckpointList,
    CheckpointMetrics,
    CheckpointPublic,
    JobCreate,
    JobEventList,
    JobEventPublic,
    JobList,
    JobPublic,
    SampleList,
    error_responses,
)
from service.core.checkpoints import checkpoint_model_id
from service.core.checkpoints import list_checkpoints as list_job_checkpoints
from service.core.config import Settings
from service.core.domain import DatasetSource, TrainingSpec, suffix_problem
from service.core.errors import InvalidInput, NotFound, ServiceUnavailable, TuneserveError
from service.core.store import Store

log = logging.getLogger("tuneserve.api.jobs")

router = APIRouter(prefix="/v1/fine_tuning/jobs", tags=["fine-tuning"], responses=error_responses())

MAX_METADATA_KEYS = 16


def _check_source(src: DatasetSource, settings: Settings, param: str, problems: list[dict[str, Any]]) -> None:
    from service.core.datasets import check_dataset_source  # pure, no torch
    try:
        check_dataset_source(src, settings.resolved_dataset_roots, param=param)
    except InvalidInput as exc:
        problems.append({"param": exc.param or param, "message": exc.message})


def _check_file(store: Store, file_id: str, tenant: str, param: str, problems: list[dict[str, Any]]) -> None:
    try:
        info = store.get_file(file_id, tenant)
    except NotFound:
        problems.append({"param": param, "message": f"no file {file_id!r}"})
        return
    if info.purpose != "fine-tune":
        problems.append({"param": param, "message": f"file {file_id!r} has purpose {info.purpose!r}, "
                                                    "not 'fine-tune'"})


def validate_job(body: JobCreate, *, state, store: Store, settings: Settings, tenant: str) -> TrainingSpec:
    """Check the whole request; raise one InvalidInput listing every problem."""
    problems: list[dict[str, Any]] = []

    if not state.is_base_model(body.model):
        problems.append({"param": "model", "message": f"model must be this service's base model "
                                                      f"{state.base_model_name!r} (got {body.model!r})"})

    # Training data: exactly one of an uploaded file or a `datasets` source.
    if body.training_file and body.training_dataset:
        problems.append({"param": "training_file", "message": "give training_file or training_dataset, not both"})
    elif not body.training_file and not body.training_dataset:
        problems.append({"param": "training_file", "message": "training_file (or training_dataset) is required"})
    if body.validation_file and body.validation_dataset:
        problems.append({"param": "validation_file",
                         "message": "give validation_file or validation_dataset, not both"})
    if body.training_file:
        _check_file(store, body.training_file, tenant, "training_file", problems)
    if body.validation_file:
        _check_file(store, body.validation_file, tenant, "validation_file", problems)
    if body.training_dataset:
        _check_source(body.training_dataset, settings, "training_dataset", problems)
    if body.validation_dataset:
        _check_source(body.validation_dataset, settings, "validation_dataset", problems)

    # Hyperparameters: top-level (OpenAI's deprecated place) or method.supervised.hyperparameters.
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
    spec: TrainingSpec | None = None
    try:
        spec = TrainingSpec.from_hyperparameters(hyper, seed=body.seed, param_prefix=prefix)
    except InvalidInput as exc:
        for d in exc.details or [{"param": exc.param or prefix, "message": exc.message}]:
            if d.get("param") == f"{prefix}.seed" and body.seed is not None:
                d = {**d, "param": "seed"}  # the client sent it at the top level
            problems.append(d)

    if body.suffix is not None and (why := suffix_problem(body.suffix)) is not None:
        problems.append({"param": "suffix", "message": why})
    if body.metadata is not None:
        if len(body.metadata) > MAX_METADATA_KEYS:
            problems.append({"param": "metadata", "message": f"at most {MAX_METADATA_KEYS} keys"})
        for k, v in body.metadata.items():
            if len(k) > 64 or len(v) > 512:
                problems.append({"param": f"metadata.{k[:64]}",
                                 "message": "keys are at most 64 characters, values at most 512"})
    if body.integrations:
        problems.append({"param": "integrations", "message": "integrations are not supported"})

    if problems:
        raise InvalidInput.from_problems(problems)
    assert spec is not None
    return spec


@router.post("", response_model=JobPublic)
def create_job(body: JobCreate, tenant: TenantDep, store: StoreDep, queue: QueueDep, settings: SettingsDep,
               state: StateDep) -> JobPublic:
    spec = validate_job(body, state=state, store=store, settings=settings, tenant=tenant)
    # The row commits first; the task carries only its id (the store is the truth).
    job = store.create_job(tenant=tenant, model=state.base_model_name, spec=spec,
                           training_file=body.training_file, validation_file=body.validation_file,
                           training_dataset=body.training_dataset, validation_dataset=body.validation_dataset,
                           suffix=body.suffix, metadata=body.metadata)
    try:
        queue.enqueue(job.id)
    except TuneserveError:
        # No orphan: a job the broker never got must not sit "queued" forever.
        try:
            store.delete_job(job.id)
        except Exception:  # pragma: no cover - logged; the recovery sweep re-enqueues queued rows
            log.exception("could not roll back job %s after a failed enqueue", job.id)
        state.metrics.enqueue_failures.inc()
        raise ServiceUnavailable("the training queue is unavailable; the job was not created, retry later",
                                 code="queue_unavailable") from None
    state.metrics.jobs_created.inc()
    log.info("job created and enqueued", extra={"job_id": job.id, "tenant": tenant})
    return JobPublic.from_domain(job)


@router.get("", response_model=JobList)
def list_jobs(tenant: TenantDep, store: StoreDep,
              after: str | None = Query(default=None, max_length=128),
              limit: int = Query(default=20, ge=1, le=100)) -> JobList:
    jobs, has_more = store.list_jobs(tenant, after=after, limit=limit)
    return JobList(data=[JobPublic.from_domain(j) for j in jobs], has_more=has_more)


@router.get("/{job_id}", response_model=JobPublic, responses=error_responses(404))
def get_job(job_id: str, tenant: TenantDep, store: StoreDep) -> JobPublic:
    return JobPublic.from_domain(store.get_job(job_id, tenant))


@router.get("/{job_id}/samples", response_model=SampleList, responses=error_responses(404))
def list_samples(job_id: str, tenant: TenantDep, store: StoreDep,
                 limit: int = Query(default=100, ge=1, le=100_000)) -> SampleList:
    """The evaluation's before/after rows (empty until the job has evaluated)."""
    return SampleList.from_metrics(store.get_job(job_id, tenant).result.get("metrics"), limit)


@router.post("/{job_id}/cancel", response_model=JobPublic, responses=error_responses(404, 409))
def cancel_job(job_id: str, tenant: TenantDep, store: StoreDep) -> JobPublic:
    job = store.request_cancel(job_id, tenant)
    log.info("job cancel requested (status now %s)", job.status.value, extra={"job_id": job.id})
    return JobPublic.from_domain(job)


@router.get("/{job_id}/events", response_model=JobEventList, responses=error_responses(404))
def list_events(job_id: str, tenant: TenantDep, store: StoreDep,
                after: str | None = Query(default=None, max_length=128),
                limit: int = Query(default=20, ge=1, le=1000)) -> JobEventList:
    store.get_job(job_id, tenant)  # 404 for another tenant's job
    events, has_more = store.list_events(job_id, after=after, limit=limit)
    return JobEventList(data=[JobEventPublic.from_domain(e) for e in events], has_more=has_more)


def _checkpoint_public(job_id: str, item: dict[str, Any]) -> CheckpointPublic:
    """One entry of service.core.checkpoints.list_checkpoints: step, created_at (unix s), loss, eval_loss, ..."""
    step = int(item.get("step") or 0)
    created = item.get("created_at")
    metrics = CheckpointMetrics(step=float(step), train_loss=item.get("loss"), valid_loss=item.get("eval_loss"))
    return CheckpointPublic(
        id=f"ftckpt-{job_id.split('-', 1)[-1]}-{step}", created_at=int(created or 0),
        fine_tuned_model_checkpoint=checkpoint_model_id(job_id, step), fine_tuning_job_id=job_id,
        step_number=step, metrics=metrics)


@router.get("/{job_id}/checkpoints", response_model=CheckpointList, responses=error_responses(404))
def list_checkpoints(job_id: str, tenant: TenantDep, store: StoreDep, settings: SettingsDep,
                     after: str | None = Query(default=None, max_length=128),
                     limit: int = Query(default=10, ge=1, le=100)) -> CheckpointList:
    store.get_job(job_id, tenant)
    job_dir = settings.jobs_dir / job_id
    items = list_job_checkpoints(job_dir)
    data = sorted((_checkpoint_public(job_id, it) for it in items), key=lambda c: c.step_number, reverse=True)
    page, has_more = page_after(data, after, limit, what="checkpoint")
    return CheckpointList(data=page, has_more=has_more,
                          first_id=page[0].id if page else None, last_id=page[-1].id if page else None)

"""/v1/fine_tuning/jobs. Thin: parse, call serving_jobs (validation, create + enqueue), return.

Nothing here imports torch or the training code: checkpoints are listed through
service.core.checkpoints, which reads their on-disk layout."""
from __future__ import annotations

import logging
from typing import Annotated, Any

from fastapi import APIRouter, Header, Query

from service.api import serving_jobs
from service.api.deps import QueueDep, SettingsDep, StateDep, StoreDep, TenantDep
from service.api.paging import After, page_after
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

log = logging.getLogger("tuneserve.api.jobs")

router = APIRouter(prefix="/v1/fine_tuning/jobs", tags=["fine-tuning"], responses=error_responses())


@router.post("", response_model=JobPublic, responses=error_responses(409))
def create_job(body: JobCreate, tenant: TenantDep, store: StoreDep, queue: QueueDep, settings: SettingsDep,
               state: StateDep,
               # Out of the OpenAPI schema (README documents it): generated requests reusing one
               # key with different bodies would be refused, which is right but not "positive data".
               idempotency_key: Annotated[str | None, Header(alias="Idempotency-Key",
                                                             include_in_schema=False)] = None) -> JobPublic:
    job = serving_jobs.create_job(body, state=state, store=store, queue=queue, settings=settings, tenant=tenant,
                                  idempotency_key=idempotency_key)
    return JobPublic.from_domain(job)


@router.get("", response_model=JobList, responses=error_responses(404))
def list_jobs(tenant: TenantDep, store: StoreDep,
              after: After = None,
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
                after: After = None,
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
                     after: After = None,
                     limit: int = Query(default=10, ge=1, le=100)) -> CheckpointList:
    store.get_job(job_id, tenant)
    job_dir = settings.jobs_dir / job_id
    items = list_job_checkpoints(job_dir)
    data = sorted((_checkpoint_public(job_id, it) for it in items), key=lambda c: c.step_number, reverse=True)
    page, has_more = page_after(data, after, limit, what="checkpoint")
    return CheckpointList(data=page, has_more=has_more,
                          first_id=page[0].id if page else None, last_id=page[-1].id if page else None)

"""The webhook outbox in the store, on SQLite and PostgreSQL: rows appear in the same
transaction as a job's final transition (and only then), one per subscribed endpoint of the
job's tenant; claims are exclusive until their lease ends; deleting an endpoint drops its rows."""
from __future__ import annotations

import json
import threading
from datetime import timedelta

import pytest

from service.core import webhooks as wh
from service.core.domain import (
    DeliveryStatus,
    JobStatus,
    TrainingSpec,
    WebhookEventType,
)
from service.core.errors import Conflict, NotFound
from service.core.store import utcnow

SUCCEEDED, FAILED, CANCELLED = (WebhookEventType.fine_tuning_job_succeeded, WebhookEventType.fine_tuning_job_failed,
                                WebhookEventType.fine_tuning_job_cancelled)
LEASE = timedelta(seconds=60)


def _job(store, tenant="alice"):
    return store.create_job(tenant=tenant, model="m", spec=TrainingSpec(max_steps=1))


def _endpoint(store, tenant="alice", types=(SUCCEEDED, FAILED, CANCELLED)):
    return store.create_webhook_endpoint(tenant=tenant, name="n", url="http://h.test/", event_types=list(types))


def _due(store, *, limit=100, lease=LEASE, later_s=0.0):
    return store.claim_due_deliveries(utcnow() + timedelta(seconds=later_s), limit=limit, lease=lease)


def test_final_transitions_write_one_row_per_subscribed_endpoint(store):
    every = _endpoint(store)
    only_ok = _endpoint(store, types=[SUCCEEDED])
    _endpoint(store, tenant="bob")  # another tenant's endpoint never sees alice's jobs
    job = _job(store)
    store.transition(job.id, JobStatus.running)
    assert _due(store) == []  # running is no event
    store.transition(job.id, JobStatus.succeeded)
    claimed = _due(store)
    assert sorted(ep.id for _, ep in claimed) == sorted([every.id, only_ok.id])
    bodies = {d.payload for d, _ in claimed}
    assert len(bodies) == 1 and len({d.id for d, _ in claimed}) == 2  # one event, one webhook-id per endpoint
    body = json.loads(bodies.pop())
    assert body == {"id": claimed[0][0].event_id, "object": "event", "type": "fine_tuning.job.succeeded",
                    "created_at": int(store.get_job(job.id).finished_at.timestamp()), "data": {"id": job.id}}

    failed = _job(store)
    store.transition(failed.id, JobStatus.failed)  # queued -> failed
    assert [(d.event_type, ep.id) for d, ep in _due(store)] == [(FAILED, every.id)]


def test_cancelling_a_queued_job_writes_the_event(store):
    ep = _endpoint(store, types=[CANCELLED])
    job = _job(store)
    store.request_cancel(job.id, "alice")
    ((d, got),) = _due(store)
    assert got.id == ep.id and d.event_type is CANCELLED and json.loads(d.payload)["data"]["id"] == job.id
    running = _job(store)
    store.transition(running.id, JobStatus.running)
    store.request_cancel(running.id, "alice")  # only asks the worker: not final yet
    assert _due(store) == []


def test_outbox_row_and_transition_commit_together(store, monkeypatch):
    _endpoint(store)
    job = _job(store)
    store.transition(job.id, JobStatus.running)

    def broken(*_a, **_k):
        raise RuntimeError("outbox write failed")

    monkeypatch.setattr(wh, "event_body", broken)
    with pytest.raises(RuntimeError):
        store.transition(job.id, JobStatus.succeeded)
    assert store.get_job(job.id).status is JobStatus.running  # the transition rolled back with it
    monkeypatch.undo()
    store.transition(job.id, JobStatus.succeeded)
    ((first, _),) = _due(store)
    with pytest.raises(Conflict):  # a refused transition writes nothing
        store.transition(job.id, JobStatus.failed)
    assert [d.id for d, _ in _due(store, later_s=3600)] == [first.id]  # only the first (its lease ended)


def test_claims_are_exclusive_until_the_lease_ends(store):
    _endpoint(store)
    job = _job(store)
    store.transition(job.id, JobStatus.failed)
    ((d, _),) = _due(store, lease=timedelta(seconds=30))
    assert d.attempts == 1
    assert _due(store, later_s=29) == []  # held by the first sender
    ((again, _),) = _due(store, later_s=31)  # that sender died: due again, same webhook-id
    assert again.id == d.id and again.attempts == 2
    now = utcnow()
    store.finish_delivery_attempt(d.id, status_code=500, error="HTTP 500", now=now, retry_at=now + timedelta(seconds=10))
    assert _due(store, later_s=9) == []
    ((third, _),) = _due(store, later_s=11)
    done = store.finish_delivery_attempt(third.id, status_code=204, error=None, now=now, retry_at=None)
    assert done.status is DeliveryStatus.succeeded and done.delivered_at is not None
    assert _due(store, later_s=10_000) == []


def test_concurrent_claims_never_share_a_row(store):
    _endpoint(store)
    for _ in range(6):
        j = _job(store)
        store.transition(j.id, JobStatus.failed)
    got: list[list[str]] = []
    barrier = threading.Barrier(3)

    def claim():
        barrier.wait()
        got.append([d.id for d, _ in _due(store, limit=2)])

    threads = [threading.Thread(target=claim) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    ids = [i for batch in got for i in batch]
    assert len(ids) == len(set(ids)) == 6


def test_endpoint_crud_is_per_tenant(store):
    ep = _endpoint(store)
    for call in (lambda: store.get_webhook_endpoint(ep.id, "bob"),
                 lambda: store.update_webhook_endpoint(ep.id, "bob", name="x"),
                 lambda: store.rotate_webhook_secret(ep.id, "bob"),
                 lambda: store.delete_webhook_endpoint(ep.id, "bob"),
                 lambda: store.list_webhook_deliveries(ep.id, "bob")):
        with pytest.raises(NotFound):
            call()
    same = store.update_webhook_endpoint(ep.id, "alice", name=ep.name)
    assert same.updated_at == ep.updated_at  # unchanged update: updated_at stays
    renamed = store.update_webhook_endpoint(ep.id, "alice", name="other")
    assert renamed.name == "other" and renamed.updated_at >= ep.updated_at and renamed.url == ep.url

    kept = store.rotate_webhook_secret(ep.id, "alice", keep_old_for=timedelta(hours=24))
    assert kept.signing_secrets(utcnow()) == [kept.secret, ep.secret]
    assert kept.signing_secrets(utcnow() + timedelta(hours=25)) == [kept.secret]
    dropped = store.rotate_webhook_secret(ep.id, "alice")
    assert dropped.signing_secrets(utcnow()) == [dropped.secret]


def test_deleting_an_endpoint_drops_its_pending_rows(store):
    doomed, kept = _endpoint(store), _endpoint(store)
    job = _job(store)
    store.transition(job.id, JobStatus.failed)
    store.delete_webhook_endpoint(doomed.id, "alice")
    assert [ep.id for _, ep in _due(store)] == [kept.id]
    with pytest.raises(NotFound):
        store.get_webhook_endpoint(doomed.id, "alice")

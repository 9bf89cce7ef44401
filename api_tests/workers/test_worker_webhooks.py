"""The worker process sends webhook deliveries by itself: its sender thread (started with the
reaper on worker_ready) picks up the outbox row a job's final transition wrote, and a real
HTTP receiver gets it signed so the `openai` SDK's verifier accepts it. No training runs."""
from __future__ import annotations

import pytest
from openai import OpenAI
from webhook_receiver import Receiver
from worker_harness import TENANT, dump_worker_logs, wait_for

from service.core.domain import TrainingSpec, WebhookEventType

pytestmark = [pytest.mark.e2e]


def test_worker_delivers_a_cancelled_jobs_event(world, store):
    world.start_worker(TUNESERVE_WEBHOOK_INTERVAL_S="0.1", TUNESERVE_WEBHOOK_BACKOFF_BASE_S="0.2")
    with Receiver([500], default=200) as rx:
        ep = store.create_webhook_endpoint(tenant=TENANT, name="w", url=rx.url,
                                           event_types=[WebhookEventType.fine_tuning_job_cancelled])
        job = store.create_job(tenant=TENANT, model="m", spec=TrainingSpec(max_steps=1))
        store.request_cancel(job.id, TENANT)  # queued -> cancelled: never sent to the broker
        wait_for(lambda: store.list_webhook_deliveries(ep.id, TENANT)[0][0].status.value == "succeeded",
                 60, "the worker's delivery", diagnostics=lambda: dump_worker_logs(world))
        reqs = rx.received()
    assert len(reqs) == 2 and reqs[0].headers["webhook-id"] == reqs[1].headers["webhook-id"]
    oa = OpenAI(api_key="unused", base_url="http://127.0.0.1:9/v1")
    event = oa.webhooks.unwrap(reqs[1].body, reqs[1].headers, secret=ep.secret)
    assert event.type == "fine_tuning.job.cancelled" and event.data.id == job.id

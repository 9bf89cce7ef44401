"""Webhooks end to end in one process: the `openai` SDK manages endpoints through the real app,
a job's final transition writes the outbox, the dispatcher (workers/webhooks.py) sends to a real
HTTP receiver, and the SDK's own verifier (`client.webhooks.unwrap`) checks every delivery.

Deliveries are driven by calling one sweep with an injected clock (no sleeping through
backoffs); one test runs the real background thread and polls with a deadline."""
from __future__ import annotations

import time
from datetime import datetime, timedelta, timezone

import openai
import pytest
from fastapi.testclient import TestClient
from openai import OpenAI
from webhook_receiver import Receiver

from service.api.app import create_app
from service.core.domain import JobStatus, TrainingSpec
from workers.webhooks import WebhookDispatcher, backoff_s

from .conftest import AUTH_A, AUTH_B, KEY_A, KEY_B, assert_error

SUCCEEDED = "fine_tuning.job.succeeded"
ALL_JOB_EVENTS = [SUCCEEDED, "fine_tuning.job.failed", "fine_tuning.job.cancelled"]


def sdk(client, key=KEY_A) -> OpenAI:
    return OpenAI(api_key=key, base_url=str(client.base_url) + "/v1", http_client=client, max_retries=0)


@pytest.fixture
def wh_settings(make_settings):
    # The background sender off: these tests run sweeps themselves.
    return make_settings(webhook_dispatcher=False, webhook_timeout_s=2.0)


@pytest.fixture
def wh_client(wh_settings):
    with TestClient(create_app(wh_settings)) as c:
        yield c


class Clock:
    def __init__(self):
        self.now = datetime.now(timezone.utc)

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


def _store(client):
    return client.app.state.tuneserve.store


def _finish_job(store, tenant="alice", status=JobStatus.succeeded) -> str:
    job = store.create_job(tenant=tenant, model="m", spec=TrainingSpec(max_steps=1))
    store.transition(job.id, JobStatus.running, worker_id="w:1")
    store.transition(job.id, status, fine_tuned_model="ft-x" if status is JobStatus.succeeded else None)
    return job.id


def _unwrap(oa: OpenAI, req, secret: str):
    return oa.webhooks.unwrap(req.body, req.headers, secret=secret)


# ---------------------------------------------------------------------------------------
# Management through the SDK
# ---------------------------------------------------------------------------------------
def test_sdk_drives_every_endpoint_route(wh_client):
    oa = sdk(wh_client)
    with Receiver() as rx:
        ep = oa.webhooks.create(event_types=[SUCCEEDED], name="ci", url=rx.url)
        assert ep.id.startswith("whep-") and ep.object == "webhook_endpoint"
        assert ep.signing_secret.startswith("whsec_") and ep.signing_secret_hint.endswith(ep.signing_secret[-4:])
        assert ep.event_types == [SUCCEEDED] and ep.url == rx.url and ep.updated_at == ep.created_at

        got = oa.webhooks.retrieve(ep.id)
        assert got.id == ep.id and not hasattr(got, "signing_secret") and "signing_secret" not in got.model_extra
        assert [e.id for e in oa.webhooks.list()] == [ep.id]

        second = oa.webhooks.create(event_types=ALL_JOB_EVENTS, name="all", url=rx.url)
        assert [e.id for e in oa.webhooks.list(limit=1)] == [second.id, ep.id]  # newest first, paged

        upd = oa.webhooks.update(ep.id, name="renamed", event_types=ALL_JOB_EVENTS)
        assert upd.name == "renamed" and upd.event_types == ALL_JOB_EVENTS and upd.url == rx.url

        rotated = oa.webhooks.rotate_secret(ep.id)
        assert rotated.signing_secret.startswith("whsec_") and rotated.signing_secret != ep.signing_secret
        rotated2 = oa.webhooks.rotate_secret(ep.id, keep_old_secret_active_for_24_hours=True)
        assert rotated2.signing_secret != rotated.signing_secret

        result = oa.webhooks.test(ep.id, event_type="fine_tuning.job.failed")
        assert result.object == "webhook_endpoint.test" and result.status_code == 200 and result.success
        assert result.webhook_endpoint_id == ep.id and result.event_type == "fine_tuning.job.failed"
        (req,) = rx.received()
        event = _unwrap(oa, req, rotated2.signing_secret)
        assert event.type == "fine_tuning.job.failed" and event.object == "event"
        # the kept old secret signs too, for 24 hours
        _unwrap(oa, req, rotated.signing_secret)
        log = wh_client.get(f"/v1/webhook_endpoints/{ep.id}/deliveries", headers=AUTH_A).json()
        assert [(d["id"], d["test"], d["status"], d["last_status_code"]) for d in log["data"]] == \
            [(req.headers["webhook-id"], True, "succeeded", 200)]

        assert oa.webhooks.event_types.list().data == ALL_JOB_EVENTS
        deleted = oa.webhooks.delete(ep.id)
        assert deleted.id == ep.id and deleted.deleted is True and deleted.object == "webhook_endpoint.deleted"
        with pytest.raises(openai.NotFoundError):
            oa.webhooks.retrieve(ep.id)
        assert [e.id for e in oa.webhooks.list()] == [second.id]


def test_another_tenants_endpoint_is_not_found(wh_client):
    with Receiver() as rx:
        ep = sdk(wh_client).webhooks.create(event_types=[SUCCEEDED], name="a", url=rx.url)
        bob = sdk(wh_client, key=KEY_B)
        for call in (lambda: bob.webhooks.retrieve(ep.id),
                     lambda: bob.webhooks.update(ep.id, name="mine"),
                     lambda: bob.webhooks.rotate_secret(ep.id),
                     lambda: bob.webhooks.test(ep.id, event_type=SUCCEEDED),
                     lambda: bob.webhooks.delete(ep.id)):
            with pytest.raises(openai.NotFoundError):
                call()
        assert_error(wh_client.get(f"/v1/webhook_endpoints/{ep.id}/deliveries", headers=AUTH_B), 404,
                     param="webhook_endpoint_id")
        assert list(bob.webhooks.list()) == []
        assert sdk(wh_client).webhooks.retrieve(ep.id).name == "a" and rx.received() == []
        # bob's job ending sends nothing to alice's endpoint
        _finish_job(_store(wh_client), tenant="bob")
        assert WebhookDispatcher(_store(wh_client), wh_client.app.state.settings).run_once().delivered == []


def test_bad_input_names_the_field(wh_client):
    r = wh_client.post("/v1/webhook_endpoints", headers=AUTH_A,
                       json={"event_types": [SUCCEEDED, "batch.completed"], "name": "x", "url": "http://h.test/"})
    assert_error(r, 400, param="event_types[1]")
    r = wh_client.post("/v1/webhook_endpoints", headers=AUTH_A,
                       json={"event_types": [SUCCEEDED], "name": "x", "url": "ftp://h.test/"})
    assert_error(r, 400, param="url")
    r = wh_client.post("/v1/webhook_endpoints", headers=AUTH_A, json={"event_types": [], "name": "x",
                                                                      "url": "http://h.test/"})
    assert_error(r, 400, param="event_types")
    r = wh_client.post("/v1/webhook_endpoints", headers=AUTH_A, json={"event_types": [SUCCEEDED], "name": "a\x00b",
                                                                      "url": "http://h.test/"})
    assert_error(r, 400, param="name")
    ep = wh_client.post("/v1/webhook_endpoints", headers=AUTH_A,
                        json={"event_types": [SUCCEEDED], "name": "x", "url": "http://h.test/"}).json()
    assert_error(wh_client.post(f"/v1/webhook_endpoints/{ep['id']}", headers=AUTH_A, json={"url": "nope"}),
                 400, param="url")
    assert_error(wh_client.post(f"/v1/webhook_endpoints/{ep['id']}/test", headers=AUTH_A,
                                json={"event_type": "batch.completed"}), 400, param="event_type")
    assert_error(wh_client.get("/v1/webhook_endpoints", headers={"Authorization": "Bearer nope"}), 401)
    # nothing half-done: the refused update changed nothing
    assert wh_client.get(f"/v1/webhook_endpoints/{ep['id']}", headers=AUTH_A).json() == \
        {k: v for k, v in ep.items() if k != "signing_secret"}


def test_unreachable_endpoint_test_says_so(wh_client):
    with Receiver() as rx:
        url = rx.url
    # the receiver is closed: nothing listens on its port any more
    ep = sdk(wh_client).webhooks.create(event_types=[SUCCEEDED], name="x", url=url)
    with pytest.raises(openai.BadRequestError) as e:
        sdk(wh_client).webhooks.test(ep.id, event_type=SUCCEEDED)
    assert e.value.body["code"] == "endpoint_unreachable" and e.value.body["param"] == "url"


# ---------------------------------------------------------------------------------------
# Deliveries
# ---------------------------------------------------------------------------------------
def test_failing_receiver_gets_the_same_event_until_it_succeeds(wh_client, wh_settings):
    oa, store = sdk(wh_client), _store(wh_client)
    with Receiver([500, 503], default=200) as rx:
        ep = oa.webhooks.create(event_types=[SUCCEEDED], name="ci", url=rx.url)
        job_id = _finish_job(store)
        clock = Clock()  # from now on, time moves only when the test says so
        dispatcher = WebhookDispatcher(store, wh_settings, clock=clock)
        assert dispatcher.run_once().retrying and len(rx.received()) == 1
        assert dispatcher.run_once().retrying == []  # not due yet: no second try before the backoff
        assert len(rx.received()) == 1
        clock.advance(backoff_s(1, wh_settings))
        assert dispatcher.run_once().retrying and len(rx.received()) == 2
        clock.advance(backoff_s(2, wh_settings) - 1)
        assert dispatcher.run_once().delivered == [] and len(rx.received()) == 2  # backoff doubled
        clock.advance(1)
        assert len(dispatcher.run_once().delivered) == 1
        assert dispatcher.run_once().delivered == []  # delivered once succeeded: no more sends
        reqs = rx.received()
    assert len(reqs) == 3 and len({r.headers["webhook-id"] for r in reqs}) == 1
    assert len({r.body for r in reqs}) == 1  # byte-identical body on every retry
    events = [_unwrap(oa, r, ep.signing_secret) for r in reqs]
    assert {(e.id, e.type, e.data.id) for e in events} == {(events[0].id, SUCCEEDED, job_id)}
    assert events[0].id.startswith("evt_") and events[0].object == "event"
    assert events[0].created_at == int(store.get_job(job_id).finished_at.timestamp())

    (log,) = wh_client.get(f"/v1/webhook_endpoints/{ep.id}/deliveries", headers=AUTH_A).json()["data"]
    assert log["id"] == reqs[0].headers["webhook-id"] and log["event_id"] == events[0].id
    assert (log["status"], log["attempts"], log["last_status_code"], log["test"]) == ("succeeded", 3, 200, False)


def test_gives_up_after_max_attempts(make_settings):
    settings = make_settings(webhook_dispatcher=False, webhook_max_attempts=2)
    with TestClient(create_app(settings)) as c, Receiver(default=500) as rx:
        ep = sdk(c).webhooks.create(event_types=ALL_JOB_EVENTS, name="x", url=rx.url)
        _finish_job(_store(c), status=JobStatus.failed)
        clock = Clock()
        dispatcher = WebhookDispatcher(_store(c), settings, clock=clock)
        dispatcher.run_once()
        clock.advance(settings.webhook_backoff_max_s)
        assert len(dispatcher.run_once().failed) == 1
        clock.advance(settings.webhook_backoff_max_s)
        dispatcher.run_once()
        assert len(rx.received()) == 2
        (log,) = c.get(f"/v1/webhook_endpoints/{ep.id}/deliveries", headers=AUTH_A).json()["data"]
        assert (log["status"], log["attempts"], log["last_error"]) == ("failed", 2, "HTTP 500")
        assert _unwrap(sdk(c), rx.received()[0], ep.signing_secret).type == "fine_tuning.job.failed"


def test_rotated_secret_signs_the_next_delivery(wh_client, wh_settings):
    oa, store = sdk(wh_client), _store(wh_client)
    dispatcher = WebhookDispatcher(store, wh_settings)
    with Receiver() as rx:
        ep = oa.webhooks.create(event_types=[SUCCEEDED], name="ci", url=rx.url)
        new = oa.webhooks.rotate_secret(ep.id).signing_secret
        _finish_job(store)
        dispatcher.run_once()
        (req,) = rx.received()
    assert _unwrap(oa, req, new).type == SUCCEEDED
    with pytest.raises(openai.InvalidWebhookSignatureError):
        _unwrap(oa, req, ep.signing_secret)  # rotated without keeping the old one: it no longer signs


def test_deleted_endpoint_gets_nothing(wh_client, wh_settings):
    oa, store = sdk(wh_client), _store(wh_client)
    dispatcher = WebhookDispatcher(store, wh_settings)
    with Receiver() as gone, Receiver() as kept:
        doomed = oa.webhooks.create(event_types=[SUCCEEDED], name="doomed", url=gone.url)
        oa.webhooks.create(event_types=[SUCCEEDED], name="kept", url=kept.url)
        _finish_job(store)  # outbox rows for both endpoints are written here ...
        oa.webhooks.delete(doomed.id)  # ... and the deleted endpoint's go with it
        _finish_job(store)
        dispatcher.run_once()
        assert gone.received() == [] and len(kept.received()) == 2


def test_redirects_are_not_followed(wh_client, wh_settings):
    dispatcher = WebhookDispatcher(_store(wh_client), wh_settings)
    with Receiver() as target, Receiver(default=302) as rx:
        rx.location = target.url
        ep = sdk(wh_client).webhooks.create(event_types=[SUCCEEDED], name="x", url=rx.url)
        _finish_job(_store(wh_client))
        assert len(dispatcher.run_once().retrying) == 1
        assert target.received() == [] and len(rx.received()) == 1
        (log,) = wh_client.get(f"/v1/webhook_endpoints/{ep.id}/deliveries", headers=AUTH_A).json()["data"]
        assert log["status"] == "pending" and log["last_status_code"] == 302 and "redirect" in log["last_error"]


def test_a_receiver_that_hangs_times_out_and_is_retried(make_settings):
    settings = make_settings(webhook_dispatcher=False, webhook_timeout_s=0.3)
    with TestClient(create_app(settings)) as c, Receiver(hold=True) as rx:
        dispatcher = WebhookDispatcher(_store(c), settings)
        ep = sdk(c).webhooks.create(event_types=[SUCCEEDED], name="x", url=rx.url)
        _finish_job(_store(c))
        assert len(dispatcher.run_once().retrying) == 1
        (log,) = c.get(f"/v1/webhook_endpoints/{ep.id}/deliveries", headers=AUTH_A).json()["data"]
        assert log["status"] == "pending" and log["last_status_code"] is None and "timed out" in log["last_error"]


def test_the_api_process_delivers_by_itself(make_settings):
    """The real component: the API's background sender, no sweep called by the test."""
    settings = make_settings(webhook_interval_s=0.05)
    with TestClient(create_app(settings)) as c, Receiver() as rx:
        oa = sdk(c)
        ep = oa.webhooks.create(event_types=["fine_tuning.job.cancelled"], name="x", url=rx.url)
        job = _store(c).create_job(tenant="alice", model="m", spec=TrainingSpec(max_steps=1))
        assert oa.fine_tuning.jobs.cancel(job.id).status == "cancelled"
        deadline = time.monotonic() + 30
        while not rx.received() and time.monotonic() < deadline:
            time.sleep(0.05)
        (req,) = rx.received()
        event = _unwrap(oa, req, ep.signing_secret)
        assert event.type == "fine_tuning.job.cancelled" and event.data.id == job.id


# ---------------------------------------------------------------------------------------
# Target URL policy
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("url", ["http://127.0.0.1:9/x", "http://localhost/x", "https://10.1.2.3/x",
                                 "http://169.254.169.254/latest", "http://[::1]/x", "http://[::ffff:192.168.0.1]/"])
def test_prod_refuses_private_targets(make_settings, url):
    with TestClient(create_app(make_settings(env="prod", webhook_dispatcher=False))) as c:
        r = c.post("/v1/webhook_endpoints", headers=AUTH_A, json={"event_types": [SUCCEEDED], "name": "x", "url": url})
        assert_error(r, 400, param="url", code="url_not_allowed")
        assert c.get("/v1/webhook_endpoints", headers=AUTH_A).json()["data"] == []


def test_prod_allows_public_and_opted_in_private_targets(make_settings):
    with TestClient(create_app(make_settings(env="prod", webhook_dispatcher=False))) as c:
        body = {"event_types": [SUCCEEDED], "name": "x", "url": "https://93.184.215.14/hook"}
        ep = c.post("/v1/webhook_endpoints", headers=AUTH_A, json=body)
        assert ep.status_code == 200, ep.text
        r = c.post(f"/v1/webhook_endpoints/{ep.json()['id']}", headers=AUTH_A, json={"url": "http://127.0.0.1/"})
        assert_error(r, 400, param="url", code="url_not_allowed")
    settings = make_settings(env="prod", webhook_dispatcher=False, webhook_allow_private_urls=True)
    with TestClient(create_app(settings)) as c, Receiver() as rx:
        ep = sdk(c).webhooks.create(event_types=[SUCCEEDED], name="x", url=rx.url)
        assert sdk(c).webhooks.test(ep.id, event_type=SUCCEEDED).status_code == 200


def test_prod_sender_rechecks_the_target(make_settings):
    """An endpoint saved while allowed is still refused at send time once the policy forbids it."""
    with Receiver() as rx:
        dev = make_settings(webhook_dispatcher=False)
        with TestClient(create_app(dev)) as c:
            ep = sdk(c).webhooks.create(event_types=[SUCCEEDED], name="x", url=rx.url)
            _finish_job(_store(c))
        prod = make_settings(env="prod", webhook_dispatcher=False)
        with TestClient(create_app(prod)) as c:
            assert len(WebhookDispatcher(_store(c), prod).run_once().retrying) == 1
            (log,) = c.get(f"/v1/webhook_endpoints/{ep.id}/deliveries", headers=AUTH_A).json()["data"]
        assert rx.received() == [] and "refused in production" in log["last_error"]


def test_one_sweep_sends_every_due_delivery_in_chunks(wh_client, wh_settings, monkeypatch):
    monkeypatch.setattr(WebhookDispatcher, "PER_SWEEP", 2 * WebhookDispatcher.CHUNK)
    oa = sdk(wh_client)
    with Receiver() as rx:
        ep = oa.webhooks.create(event_types=[SUCCEEDED], name="x", url=rx.url)
        jobs = sorted(_finish_job(_store(wh_client)) for _ in range(2 * WebhookDispatcher.CHUNK + 1))
        dispatcher = WebhookDispatcher(_store(wh_client), wh_settings)
        assert len(dispatcher.run_once().delivered) == 2 * WebhookDispatcher.CHUNK  # bounded per sweep
        assert len(dispatcher.run_once().delivered) == 1
        reqs = rx.received()
    assert sorted(_unwrap(oa, r, ep.signing_secret).data.id for r in reqs) == jobs  # each job's event once

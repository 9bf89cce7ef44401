"""Webhook endpoint logic between the thin routes and the store: input checks (event types,
target URL policy), secret rotation, the one-off test send, the delivery log."""
from __future__ import annotations

import time
from datetime import timedelta
from typing import Annotated

from fastapi import Depends

from service.api.deps import SettingsDep, StoreDep
from service.api.schemas import (
    WebhookDeliveryList,
    WebhookDeliveryPublic,
    WebhookEndpointCreate,
    WebhookEndpointDeleted,
    WebhookEndpointList,
    WebhookEndpointPublic,
    WebhookEndpointUpdate,
    WebhookEndpointWithSecret,
    WebhookTestResult,
)
from service.core import webhooks as wh
from service.core.config import Settings
from service.core.domain import WebhookEventType
from service.core.errors import InvalidInput
from service.core.store import Store

SUPPORTED_EVENT_TYPES = [t.value for t in WebhookEventType]
# What a test event's data.id names (no real job is involved).
TEST_OBJECT_ID = "ftjob-test"
KEEP_OLD_SECRET = timedelta(hours=24)


def _unsupported(value: str) -> str:
    return f"{value!r} is not an event type this service sends (one of {', '.join(SUPPORTED_EVENT_TYPES)})"


def parse_event_type(value: str, *, param: str = "event_type") -> WebhookEventType:
    if value not in SUPPORTED_EVENT_TYPES:
        raise InvalidInput(_unsupported(value), param=param)
    return WebhookEventType(value)


def parse_event_types(values: list[str], *, param: str = "event_types") -> list[WebhookEventType]:
    """Known types in the order given, duplicates dropped; every unknown one reported at once."""
    problems = [{"param": f"{param}[{i}]", "message": _unsupported(v)}
                for i, v in enumerate(values) if v not in SUPPORTED_EVENT_TYPES]
    if problems:
        raise InvalidInput("; ".join(p["message"] for p in problems), param=problems[0]["param"],
                           details=problems)
    return [WebhookEventType(v) for v in dict.fromkeys(values)]


class WebhookService:
    def __init__(self, store: Store, settings: Settings):
        self.store = store
        self.settings = settings

    def _check_url(self, url: str) -> str:
        return wh.check_target_url(url, allow_private=self.settings.webhook_private_urls_allowed)

    def create(self, tenant: str, body: WebhookEndpointCreate) -> WebhookEndpointWithSecret:
        types = parse_event_types(body.event_types)
        endpoint = self.store.create_webhook_endpoint(tenant=tenant, name=body.name, url=self._check_url(body.url),
                                                      event_types=types)
        return WebhookEndpointWithSecret.from_domain(endpoint)

    def list(self, tenant: str, *, after: str | None, limit: int) -> WebhookEndpointList:
        endpoints, has_more = self.store.list_webhook_endpoints(tenant, after=after, limit=limit)
        data = [WebhookEndpointPublic.from_domain(e) for e in endpoints]
        return WebhookEndpointList(data=data, has_more=has_more, first_id=data[0].id if data else None,
                                   last_id=data[-1].id if data else None)

    def retrieve(self, tenant: str, endpoint_id: str) -> WebhookEndpointPublic:
        return WebhookEndpointPublic.from_domain(self.store.get_webhook_endpoint(endpoint_id, tenant))

    def update(self, tenant: str, endpoint_id: str, body: WebhookEndpointUpdate) -> WebhookEndpointPublic:
        self.store.get_webhook_endpoint(endpoint_id, tenant)  # 404 before 400 for someone else's endpoint
        types = parse_event_types(body.event_types) if body.event_types is not None else None
        url = self._check_url(body.url) if body.url is not None else None
        endpoint = self.store.update_webhook_endpoint(endpoint_id, tenant, name=body.name, url=url,
                                                      event_types=types)
        return WebhookEndpointPublic.from_domain(endpoint)

    def delete(self, tenant: str, endpoint_id: str) -> WebhookEndpointDeleted:
        return WebhookEndpointDeleted(id=self.store.delete_webhook_endpoint(endpoint_id, tenant).id)

    def rotate_secret(self, tenant: str, endpoint_id: str, *, keep_old: bool) -> WebhookEndpointWithSecret:
        endpoint = self.store.rotate_webhook_secret(endpoint_id, tenant,
                                                    keep_old_for=KEEP_OLD_SECRET if keep_old else None)
        return WebhookEndpointWithSecret.from_domain(endpoint)

    def test(self, tenant: str, endpoint_id: str, event_type: str) -> WebhookTestResult:
        """Send one sample event now (not through the outbox, never retried) and log it."""
        from workers.webhooks import WebhookSender  # httpx only; no torch

        endpoint = self.store.get_webhook_endpoint(endpoint_id, tenant)
        etype = parse_event_type(event_type)
        evt, msg_id = wh.event_id(), wh.delivery_id()
        payload = wh.event_body(evt, etype, int(time.time()), TEST_OBJECT_ID)
        sender = WebhookSender(self.settings)
        try:
            result = sender.send(endpoint, msg_id, payload)
        finally:
            sender.close()
        self.store.record_test_delivery(endpoint, msg_id=msg_id, event_id=evt, event_type=etype, payload=payload,
                                        status_code=result.status_code, error=result.error)
        if result.status_code is None:
            raise InvalidInput(f"url: the endpoint did not answer ({result.error})", param="url",
                               code="endpoint_unreachable")
        return WebhookTestResult(event_type=etype, status_code=result.status_code, webhook_endpoint_id=endpoint.id,
                                 delivery_id=msg_id)

    def deliveries(self, tenant: str, endpoint_id: str, *, after: str | None, limit: int) -> WebhookDeliveryList:
        items, has_more = self.store.list_webhook_deliveries(endpoint_id, tenant, after=after, limit=limit)
        data = [WebhookDeliveryPublic.from_domain(d) for d in items]
        return WebhookDeliveryList(data=data, has_more=has_more, first_id=data[0].id if data else None,
                                   last_id=data[-1].id if data else None)


def get_webhook_service(store: StoreDep, settings: SettingsDep) -> WebhookService:
    return WebhookService(store, settings)


WebhooksDep = Annotated[WebhookService, Depends(get_webhook_service)]

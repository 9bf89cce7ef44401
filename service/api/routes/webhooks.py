"""/v1/webhook_endpoints as the `openai` SDK's `client.webhooks` calls them, plus
/v1/webhook_event_types and (ours) the delivery log. Thin: parse, call, return."""
from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Query

from service.api.deps import TenantDep
from service.api.paging import After
from service.api.schemas import (
    ErrorResponse,
    WebhookDeliveryList,
    WebhookEndpointCreate,
    WebhookEndpointDeleted,
    WebhookEndpointList,
    WebhookEndpointPublic,
    WebhookEndpointUpdate,
    WebhookEndpointWithSecret,
    WebhookEventTypeList,
    WebhookRotateSecret,
    WebhookTestCreate,
    WebhookTestResult,
    error_responses,
)
from service.api.serving_webhooks import SUPPORTED_EVENT_TYPES, WebhooksDep

router = APIRouter(tags=["webhooks"], responses=error_responses())

PREFIX = "/v1/webhook_endpoints"
_ERR = {"model": ErrorResponse,
        "description": "OpenAI-shaped error: {\"error\": {\"message\", \"type\", \"param\", \"code\"}}"}
_400: dict[int | str, dict[str, Any]] = {400: {**_ERR, "description": "invalid field (named in `param`), "
                                                                    "or `url` refused by the target policy"}}
_401 = {401: {**_ERR, "description": "missing or invalid API key"}}
_404 = {404: {**_ERR, "description": "no such endpoint for this tenant (another tenant's answers 404 too)"}}


@router.post(PREFIX, response_model=WebhookEndpointWithSecret, responses={**_400, **_401},
             summary="Create a webhook endpoint (the signing secret is returned only here and by rotate)")
def create_endpoint(body: WebhookEndpointCreate, tenant: TenantDep, svc: WebhooksDep) -> WebhookEndpointWithSecret:
    return svc.create(tenant, body)


@router.get(PREFIX, response_model=WebhookEndpointList, responses={**_400, **_401, **_404})
def list_endpoints(tenant: TenantDep, svc: WebhooksDep,
                   after: After = None,
                   limit: int = Query(default=20, ge=1, le=100)) -> WebhookEndpointList:
    return svc.list(tenant, after=after, limit=limit)


@router.get(PREFIX + "/{webhook_endpoint_id}", response_model=WebhookEndpointPublic, responses={**_401, **_404})
def retrieve_endpoint(webhook_endpoint_id: str, tenant: TenantDep, svc: WebhooksDep) -> WebhookEndpointPublic:
    return svc.retrieve(tenant, webhook_endpoint_id)


@router.post(PREFIX + "/{webhook_endpoint_id}", response_model=WebhookEndpointPublic,
             responses={**_400, **_401, **_404})
def update_endpoint(webhook_endpoint_id: str, body: WebhookEndpointUpdate, tenant: TenantDep,
                    svc: WebhooksDep) -> WebhookEndpointPublic:
    return svc.update(tenant, webhook_endpoint_id, body)


@router.delete(PREFIX + "/{webhook_endpoint_id}", response_model=WebhookEndpointDeleted,
               responses={**_401, **_404}, summary="Delete an endpoint; its pending deliveries are dropped")
def delete_endpoint(webhook_endpoint_id: str, tenant: TenantDep, svc: WebhooksDep) -> WebhookEndpointDeleted:
    return svc.delete(tenant, webhook_endpoint_id)


@router.post(PREFIX + "/{webhook_endpoint_id}/rotate_secret", response_model=WebhookEndpointWithSecret,
             responses={**_400, **_401, **_404})
def rotate_secret(webhook_endpoint_id: str, tenant: TenantDep, svc: WebhooksDep,
                  body: WebhookRotateSecret | None = None) -> WebhookEndpointWithSecret:
    keep_old = body.keep_old_secret_active_for_24_hours if body is not None else False
    return svc.rotate_secret(tenant, webhook_endpoint_id, keep_old=keep_old)


@router.post(PREFIX + "/{webhook_endpoint_id}/test", response_model=WebhookTestResult,
             responses={**_400, **_401, **_404},
             summary="Send one sample event now; 400 with code endpoint_unreachable when it does not answer")
def test_endpoint(webhook_endpoint_id: str, body: WebhookTestCreate, tenant: TenantDep,
                  svc: WebhooksDep) -> WebhookTestResult:
    return svc.test(tenant, webhook_endpoint_id, body.event_type)


@router.get(PREFIX + "/{webhook_endpoint_id}/deliveries", response_model=WebhookDeliveryList,
            responses={**_400, **_401, **_404}, summary="Delivery log of an endpoint, newest first (ours)")
def list_deliveries(webhook_endpoint_id: str, tenant: TenantDep, svc: WebhooksDep,
                    after: After = None,
                    limit: int = Query(default=20, ge=1, le=100)) -> WebhookDeliveryList:
    return svc.deliveries(tenant, webhook_endpoint_id, after=after, limit=limit)


@router.get("/v1/webhook_event_types", response_model=WebhookEventTypeList, responses={**_401})
def list_event_types(tenant: TenantDep) -> WebhookEventTypeList:
    return WebhookEventTypeList(data=SUPPORTED_EVENT_TYPES)

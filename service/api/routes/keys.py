"""/v1/api_keys (ours): the caller's tenant lists its keys by prefix, creates one (shown once)
and revokes one. Another tenant's key answers 404. Thin: parse, call, return."""
from __future__ import annotations

from anyio import to_thread
from fastapi import APIRouter

from service.api.deps import StoreDep, TenantDep
from service.api.schemas import ApiKeyCreate, ApiKeyList, ApiKeyPublic, ApiKeyWithSecret, error_responses
from service.core.errors import NotFound

router = APIRouter(prefix="/v1/api_keys", tags=["api keys"], responses=error_responses())


@router.get("", response_model=ApiKeyList)
async def list_keys(tenant: TenantDep, store: StoreDep) -> ApiKeyList:
    keys = await to_thread.run_sync(store.list_api_keys, tenant)
    return ApiKeyList(data=[ApiKeyPublic.from_domain(k) for k in keys])


@router.post("", response_model=ApiKeyWithSecret, responses=error_responses(400))
async def create_key(tenant: TenantDep, store: StoreDep, body: ApiKeyCreate | None = None) -> ApiKeyWithSecret:
    key, info = await to_thread.run_sync(lambda: store.create_api_key(tenant, name=body.name if body else None))
    return ApiKeyWithSecret(**ApiKeyPublic.from_domain(info).model_dump(), key=key)


@router.delete("/{key_id}", response_model=ApiKeyPublic, responses=error_responses(404))
async def revoke_key(key_id: str, tenant: TenantDep, store: StoreDep) -> ApiKeyPublic:
    def revoke():
        if not any(k.id == key_id for k in store.list_api_keys(tenant)):
            raise NotFound(f"api key {key_id!r} not found", param="key_id")
        return store.revoke_api_key(key_id)
    return ApiKeyPublic.from_domain(await to_thread.run_sync(revoke))

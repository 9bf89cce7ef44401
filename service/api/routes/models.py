"""/v1/models: the base model plus this tenant's adapters (OpenAI's model list)."""
from __future__ import annotations

from anyio import to_thread
from fastapi import APIRouter

from service.api.deps import RegistryDep, StateDep, TenantDep
from service.api.schemas import ModelDeleted, ModelList, ModelPublic, error_responses, unix
from service.core.domain import AdapterManifest
from service.core.errors import InvalidInput, NotFound
from service.core.identity import public_id

router = APIRouter(prefix="/v1/models", tags=["models"], responses=error_responses())


def _base(state) -> ModelPublic:
    return ModelPublic(id=state.base_model_name, created=state.extra.get("started_at", 0), owned_by="tuneserve",
                       kind="base")


def _adapter(m: AdapterManifest, state) -> ModelPublic:
    return ModelPublic(id=m.model_id, created=unix(m.created_at) or 0, owned_by="user", kind="adapter",
                       base_model=public_id(m.base_model, state.settings), version=m.version)


@router.get("", response_model=ModelList)
def list_models(tenant: TenantDep, registry: RegistryDep, state: StateDep) -> ModelList:
    return ModelList(data=[_base(state)] + [_adapter(m, state) for m in registry.list(tenant)])


@router.get("/{model:path}", response_model=ModelPublic, responses=error_responses(404))
async def get_model(model: str, tenant: TenantDep, registry: RegistryDep, state: StateDep) -> ModelPublic:
    # `:path` because hub ids ("THUDM/chatglm3-6b") contain a slash.
    if state.base_model.is_base(model):
        return _base(state)
    try:
        manifest = (await to_thread.run_sync(registry.resolve, tenant, model))[1]
    except (NotFound, InvalidInput):  # a name that cannot exist is as unknown as one that does not
        raise NotFound(f"model {model!r} does not exist (base model: {state.base_model_name!r})",
                       param="model", code="model_not_found") from None
    return _adapter(manifest, state)


@router.delete("/{model:path}", response_model=ModelDeleted, responses=error_responses(404, 409))
def delete_model(model: str, tenant: TenantDep, state: StateDep) -> ModelDeleted:
    if state.is_base_model(model):
        raise InvalidInput("the base model cannot be deleted", param="model")
    try:
        state.delete_adapter(tenant, model)
    except (NotFound, InvalidInput):
        raise NotFound(f"model {model!r} does not exist", param="model", code="model_not_found") from None
    return ModelDeleted(id=model)

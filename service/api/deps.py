"""Request dependencies: the app's state objects and the caller's tenant.

Route signatures use the Annotated aliases (`TenantDep`, `StoreDep`, ...) so every route
that touches tenant data is authenticated by construction."""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Annotated, Any

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from service.core.config import Settings
from service.core.errors import InvalidInput, ServiceUnavailable, Unauthorized
from service.core.identity import BaseModelIdentity

from service.api.queue import JobQueue
from service.core.registry import AdapterRegistry
from service.core.store import Store

if TYPE_CHECKING:  # types only: the engine module pulls in torch, the API's job routes must not
    from service.api.metrics import ApiMetrics
    from service.api.serving_chat import ServingChat
    from service.inference.engine import InferenceEngine


@dataclass
class AppState:
    """Everything the lifespan owns. One instance per app (no module-level state)."""
    settings: Settings
    store: Store
    registry: AdapterRegistry
    queue: JobQueue
    metrics: "ApiMetrics"
    base_model: BaseModelIdentity  # the engine's when it runs (app.base_model_identity)
    engine: "InferenceEngine | None" = None
    engine_error: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def base_model_name(self) -> str:
        return self.base_model.public_id

    def is_base_model(self, name: str | None) -> bool:
        """Is `name` one of the base model's names? (Not the empty/sentinel "no model".)"""
        return bool(name) and name in self.base_model.names

    def delete_adapter(self, tenant: str, name: str, version: int | None = None) -> None:
        """Delete from the registry (the truth; NotFound/InvalidInput raise), then free the
        engine's copies now rather than when LRU pressure reaches them."""
        self.registry.delete(tenant, name, version)
        if self.engine is not None:
            self.engine.evict_adapter(tenant, name)


# The accessors below are `async def` on purpose: they do no I/O, and FastAPI runs every sync
# dependency in the threadpool, so as plain functions each cost a thread round trip per request
# (five of them on POST /v1/fine_tuning/jobs: a fifth of its CPU under load).
async def get_state(request: Request) -> AppState:
    state = getattr(request.app.state, "tuneserve", None)
    if state is None:  # only when the app runs without its lifespan
        raise ServiceUnavailable("service is starting", code="starting")
    return state


StateDep = Annotated[AppState, Depends(get_state)]


async def get_settings_dep(state: StateDep) -> Settings:
    return state.settings


async def get_store(state: StateDep) -> Store:
    return state.store


async def get_registry(state: StateDep) -> AdapterRegistry:
    return state.registry


async def get_queue(state: StateDep) -> JobQueue:
    return state.queue


async def get_engine(state: StateDep) -> "InferenceEngine":
    if state.engine is None:
        why = f": {state.engine_error}" if state.engine_error else " (engine disabled by settings)"
        raise ServiceUnavailable(f"chat is unavailable{why}", code="engine_unavailable")
    return state.engine


async def get_chat(state: StateDep, engine: Annotated[Any, Depends(get_engine)]) -> "ServingChat":
    from service.api.serving_chat import ServingChat

    return ServingChat(state, engine)


# Declares the scheme in the OpenAPI spec only; the header is parsed strictly below.
_bearer = HTTPBearer(auto_error=False, description="API key: `Authorization: Bearer <key>`")
# One space after the scheme, then the key: visible ASCII only, nothing around it (a key with
# stray whitespace is a different, invalid key, not a lenient match).
_BEARER = re.compile(r"^[Bb][Ee][Aa][Rr][Ee][Rr] ([\x21-\x7e]{1,512})$")


def bearer_key(request: Request) -> str:
    """The API key of `Authorization: Bearer <key>`. Two Authorization headers are a 400 (which
    one counts would be a proxy's guess); a missing or malformed one, a 401."""
    values = request.headers.getlist("authorization")
    if len(values) > 1:
        raise InvalidInput("send exactly one Authorization header", param="Authorization",
                           code="duplicate_header")
    if not values:
        raise Unauthorized("missing API key: send `Authorization: Bearer <key>`")
    m = _BEARER.fullmatch(values[0])
    if m is None:
        raise Unauthorized("invalid API key: send `Authorization: Bearer <key>` (one space, no other whitespace)")
    return m.group(1)


def get_tenant(state: StateDep, request: Request,
               _scheme: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]) -> str:
    # Sync on purpose: FastAPI runs it in the threadpool, so the (sync) store lookup never
    # blocks the event loop.
    key = bearer_key(request)
    try:
        tenant = state.store.tenant_for_key(key)
    except Unauthorized:
        raise
    except LookupError:  # pragma: no cover - defensive: store answers None for unknown keys
        tenant = None
    if not tenant:
        raise Unauthorized("invalid API key")
    return tenant


SettingsDep = Annotated[Settings, Depends(get_settings_dep)]
StoreDep = Annotated[Store, Depends(get_store)]
RegistryDep = Annotated[AdapterRegistry, Depends(get_registry)]
QueueDep = Annotated[JobQueue, Depends(get_queue)]
# Typed Any so that importing deps never imports the engine (torch).
EngineDep = Annotated[Any, Depends(get_engine)]
TenantDep = Annotated[str, Depends(get_tenant)]
ChatDep = Annotated[Any, Depends(get_chat)]

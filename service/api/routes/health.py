"""Liveness, readiness and Prometheus metrics. None of these need an API key:
orchestrators and Prometheus scrapers do not send bearer tokens. /metrics carries only
aggregate numbers (no tenant names, ids or content) and can be switched off with
TUNESERVE_METRICS_ENABLED=false (it then answers 404)."""
from __future__ import annotations

from anyio import to_thread
from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response

from service.api.deps import StateDep
from service.api.metrics import CONTENT_TYPE
from service.api.schemas import error_responses
from service.core.errors import NotFound

router = APIRouter(tags=["health"])


@router.get("/healthz", responses=error_responses(500, common=False))
def healthz() -> dict[str, str]:
    return {"status": "ok"}


def _db_ok(state) -> bool:
    try:
        return bool(state.store.ping())
    except Exception:
        return False


@router.get("/readyz", responses={503: {"description": "a dependency is not ready (same body, status not_ready)"},
                                   **error_responses(500, common=False)})
async def readyz(state: StateDep) -> JSONResponse:
    db = await to_thread.run_sync(_db_ok, state)
    broker = await to_thread.run_sync(state.queue.ping)
    if state.engine is None:
        engine = "disabled" if state.engine_error is None else "failed"
    else:
        try:
            engine = "ready" if state.engine.ready() else "loading"
        except Exception:
            engine = "failed"
    checks = {"database": "ok" if db else "unreachable", "broker": "ok" if broker else "unreachable",
              "engine": engine}
    ok = db and broker and engine in ("ready", "disabled")
    body = {"status": "ready" if ok else "not_ready", "checks": checks, "base_model": state.base_model_name}
    if state.engine_error:
        body["engine_error"] = state.engine_error
    return JSONResponse(body, status_code=200 if ok else 503)


@router.get("/metrics", response_class=Response,
            responses={200: {"content": {CONTENT_TYPE: {}}}, **error_responses(404, 500, common=False)})
async def metrics(state: StateDep) -> Response:
    if not state.settings.metrics_enabled:
        raise NotFound("metrics are disabled", code="not_found")
    # Collectors query the store and Redis: keep that off the event loop.
    payload = await to_thread.run_sync(state.metrics.render)
    return Response(payload, media_type=CONTENT_TYPE)

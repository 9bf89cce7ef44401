"""The FastAPI application: `create_app(settings)` and the lifespan that owns the app state
(one Store, one AdapterRegistry, one JobQueue, one InferenceEngine, one metrics registry).

Nothing in this module imports torch: the engine module is imported inside the lifespan,
and only when the engine is enabled."""
from __future__ import annotations

import logging
import time
import uuid
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, AsyncIterator

from anyio import to_thread
from fastapi import FastAPI
from fastapi.responses import FileResponse, HTMLResponse
from fastapi.staticfiles import StaticFiles

from service.api.deps import AppState
from service.api.errors import install_error_handlers
from service.api.metrics import ApiMetrics
from service.api.queue import JobQueue
from service.api.routes import adapters, chat, files, health, jobs, keys, models, webhooks
from service.api.uploads import clean_stale_parts
from service.core.checkpoints import CheckpointModels
from service.core.config import Settings, get_settings
from service.core.domain import TENANT_PATTERN
from service.core.errors import InvalidInput
from service.core.identity import BaseModelIdentity
from service.core.registry import AdapterRegistry
from service.core.store import Store
from service.logging import log_context

log = logging.getLogger("tuneserve.api")

STATIC_DIR = Path(__file__).parent / "static"

_PLACEHOLDER = """<!doctype html><html><head><meta charset="utf-8"><title>tuneserve</title></head>
<body><h1>tuneserve</h1><p>The dashboard is not installed. API: <a href="/docs">/docs</a></p></body></html>"""


def base_model_identity(settings: Settings, engine: Any | None) -> BaseModelIdentity:
    """The engine's identity when it runs, else the same rule applied to TUNESERVE_BASE_MODEL
    (an empty one meaning the demo model, as on a CPU host)."""
    return engine.identity if engine is not None else BaseModelIdentity.of(settings.base_model, settings)


def base_model_names(settings: Settings, engine: Any | None) -> tuple[str, frozenset[str]]:
    """(the name the service reports, other names clients may use for it)."""
    identity = base_model_identity(settings, engine)
    return identity.public_id, identity.aliases


def _register_settings_keys(store: Store, settings: Settings) -> None:
    for key, tenant in settings.parsed_api_keys().items():
        if not TENANT_PATTERN.fullmatch(tenant):
            raise InvalidInput(f"TUNESERVE_API_KEYS: tenant {tenant!r} must match {TENANT_PATTERN.pattern}",
                               param="api_keys")
        store.create_api_key(tenant, name="settings", key=key)


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    settings: Settings = app.state.settings
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    settings.files_dir.mkdir(parents=True, exist_ok=True)
    await to_thread.run_sync(clean_stale_parts, settings.files_dir)
    store = await to_thread.run_sync(Store, settings.resolved_database_url)
    queue: JobQueue | None = None
    engine = None
    reaper = None
    webhook_thread = None
    try:
        await to_thread.run_sync(_register_settings_keys, store, settings)
        # Chat and the adapter routes also accept a checkpoint's fine_tuned_model_checkpoint.
        registry = CheckpointModels(AdapterRegistry(settings.resolved_registry_dir), settings.jobs_dir,
                                    store.get_job)
        queue = JobQueue(settings)
        metrics = ApiMetrics()
        engine_error: str | None = None
        if settings.engine_enabled:
            from service.inference.engine import InferenceEngine  # torch lives behind this import
            engine = InferenceEngine(settings, registry)
            try:
                await engine.start()
            except Exception as exc:  # keep files/jobs serving; readyz and chat say what broke
                log.exception("inference engine failed to start")
                engine_error = f"{type(exc).__name__}: {exc}"
                try:
                    await engine.stop()
                except Exception:  # pragma: no cover
                    pass
                engine = None
        identity = base_model_identity(settings, engine)
        state = AppState(settings=settings, store=store, registry=registry, queue=queue, metrics=metrics,
                         base_model=identity, engine=engine,
                         engine_error=engine_error, extra={"started_at": int(time.time())})
        metrics.attach(state)
        if settings.api_reaper:
            # The workers' sweep, also here: with every worker dead, nothing else would notice.
            from workers.celery_app import make_celery  # neither imports torch
            from workers.reaper import ReaperThread
            reaper = ReaperThread(make_celery(settings), settings)
            reaper.start()
        if settings.webhook_dispatcher:
            from workers.webhooks import WebhookThread  # httpx only; no torch
            webhook_thread = WebhookThread(settings)
            webhook_thread.start()
        app.state.tuneserve = state
        log.info("tuneserve API ready: base model %s, engine %s", identity.public_id,
                 "on" if engine else ("failed" if engine_error else "disabled"))
        yield
    finally:
        app.state.tuneserve = None
        if reaper is not None:
            reaper.stop()
            await to_thread.run_sync(reaper.join, 10)
        if webhook_thread is not None:
            webhook_thread.stop()
            await to_thread.run_sync(webhook_thread.join, 10)
        if engine is not None:
            try:
                await engine.stop()
            except Exception:  # pragma: no cover
                log.exception("engine stop failed")
        if queue is not None:
            queue.close()
        await to_thread.run_sync(store.close)


class RequestContextMiddleware:
    """Pure ASGI (streams pass through untouched): X-Request-ID in and out, HTTP metrics by
    route template, one access log line with the request id."""

    def __init__(self, app: Any):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        rid = None
        for k, v in scope.get("headers", []):
            if k == b"x-request-id":
                rid = v.decode("latin-1")[:64]
                break
        if not rid or not rid.isprintable():
            rid = uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = rid
        started = time.perf_counter()
        status = 500

        async def _send(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message.setdefault("headers", [])
                message["headers"] = list(message["headers"]) + [(b"x-request-id", rid.encode("latin-1"))]
            await send(message)

        try:
            # Every line logged while serving this request (routes, engine admission) carries its id.
            with log_context(request_id=rid):
                await self.app(scope, receive, _send)
        finally:
            route = scope.get("route")
            template = getattr(route, "path", None) or "unmatched"
            elapsed = time.perf_counter() - started
            app = scope.get("app")
            state = getattr(getattr(app, "state", None), "tuneserve", None)
            if state is not None:
                state.metrics.http_requests.labels(template, scope["method"], str(status)).inc()
                state.metrics.http_latency.labels(template, scope["method"]).observe(elapsed)
            log.info("request", extra={"request_id": rid, "method": scope["method"], "route": template,
                                       "status": status, "duration_ms": round(elapsed * 1000, 1)})


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()
    app = FastAPI(
        title="tuneserve",
        version="0.1.0",
        description="Fine-tune LoRA adapters for one shared 4-bit base model and chat with any of them. "
                    "OpenAI-compatible under /v1. Every route except /healthz, /readyz and /metrics "
                    "needs `Authorization: Bearer <key>`.",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.tuneserve = None
    install_error_handlers(app)
    for module in (files, jobs, chat, models, adapters, webhooks, keys, health):
        app.include_router(module.router)

    # The dashboard: a static shell (no auth: it holds no data; it calls the API with a key).
    if STATIC_DIR.is_dir():
        app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")

    @app.get("/", include_in_schema=False)
    def dashboard():
        index = STATIC_DIR / "index.html"
        if index.is_file():
            return FileResponse(index, media_type="text/html")
        return HTMLResponse(_PLACEHOLDER)

    app.add_middleware(RequestContextMiddleware)
    _document_errors_as_answered(app)
    return app


def _document_errors_as_answered(app: FastAPI) -> None:
    """FastAPI documents a 422 for every route with parameters; request validation errors leave
    as 400 with our error body (service.api.errors), declared per route with `responses=`, so
    the 422 and its schemas are dropped from the spec."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = build()
            for item in schema.get("paths", {}).values():
                for op in item.values():
                    if isinstance(op, dict):
                        op.get("responses", {}).pop("422", None)
            components = schema.get("components", {}).get("schemas", {})
            for name in ("HTTPValidationError", "ValidationError"):
                components.pop(name, None)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]

"""The ONE place that turns exceptions into HTTP answers.

Every error leaves the API as OpenAI's shape
``{"error": {"message", "type", "param", "code"}}`` (plus ``details`` listing every problem
when there were several), so the `openai` SDK raises its typed errors for ours too.
"""
from __future__ import annotations

import logging
import math
import typing
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

from service.core.errors import (
    InvalidInput,
    NotFound,
    QueueFull,
    TuneserveError,
    Unauthorized,
    unknown_key_message,
)

log = logging.getLogger("tuneserve.api")

# Starlette's own HTTP errors (unknown route, wrong method, ...) mapped onto our types.
_HTTP_TYPES: dict[int, tuple[str, str]] = {
    400: ("invalid_request_error", "invalid_value"),
    401: ("authentication_error", "invalid_api_key"),
    403: ("permission_error", "forbidden"),
    404: ("invalid_request_error", "not_found"),
    405: ("invalid_request_error", "method_not_allowed"),
    413: ("invalid_request_error", "payload_too_large"),
    415: ("invalid_request_error", "unsupported_media_type"),
    429: ("rate_limit_error", "rate_limited"),
}


def error_body(message: str, *, type: str, param: str | None = None, code: str | None = None,
               details: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    err: dict[str, Any] = {"message": message, "type": type, "param": param, "code": code}
    if details:
        err["details"] = details
    return {"error": err}


def response_for(exc: TuneserveError) -> JSONResponse:
    headers: dict[str, str] = {}
    if isinstance(exc, QueueFull):
        headers["Retry-After"] = str(max(1, math.ceil(exc.retry_after)))
    if isinstance(exc, Unauthorized):
        headers["WWW-Authenticate"] = "Bearer"
    return JSONResponse(exc.to_body(), status_code=exc.status_code, headers=headers)


def _loc_to_param(loc: tuple[Any, ...] | list[Any]) -> str:
    # FastAPI prefixes the location with where it came from ("body", "query", "path", ...);
    # clients know their field names, not our parameter plumbing.
    parts = list(loc)
    if parts and parts[0] in ("body", "query", "path", "header", "cookie", "form"):
        parts = parts[1:]
    out = ""
    for p in parts:
        if isinstance(p, int):
            out += f"[{p}]"
        else:
            out += ("." if out else "") + str(p)
    return out or str(loc[0] if loc else "body")


def _model_in(annotation: Any) -> type[BaseModel] | None:
    """The pydantic model an annotation holds (through Optional, list, Annotated, ...)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        if (model := _model_in(arg)) is not None:
            return model
    return None


def _keys_at(body_model: type[BaseModel] | None, loc: list[Any]) -> list[str] | None:
    """The keys the body model accepts at `loc` (the path of the unknown key), if it knows."""
    model = body_model
    for part in loc[:-1]:
        if isinstance(part, int):  # a list index: same model
            continue
        field = model.model_fields.get(part) if model is not None else None
        model = _model_in(field.annotation) if field is not None else None
    if model is None:
        return None
    return [f.alias or name for name, f in model.model_fields.items()]


def _malformed_json(err: dict[str, Any], body: Any) -> InvalidInput:
    """FastAPI's json_invalid error ("loc": ["body", <char offset>]) said in words."""
    loc = err.get("loc") or ()
    pos = loc[-1] if loc and isinstance(loc[-1], int) else None
    why = (err.get("ctx") or {}).get("error") or "malformed"
    where = ""
    if pos is not None:
        where = f" at character {pos}"
        if isinstance(body, (str, bytes)):
            text = body.decode("utf-8", "replace") if isinstance(body, bytes) else body
            line = text.count("\n", 0, pos) + 1
            column = pos - (text.rfind("\n", 0, pos) + 1) + 1
            where = f" at line {line}, column {column} (character {pos})"
    return InvalidInput(f"the request body is not valid JSON: {why}{where}", param=None, code="invalid_json")


def validation_error(exc: RequestValidationError, body_model: type[BaseModel] | None = None) -> InvalidInput:
    details = []
    for err in exc.errors():
        if err.get("type") == "json_invalid":
            return _malformed_json(err, getattr(exc, "body", None))
        loc = list(err.get("loc", ()))
        param = _loc_to_param(loc)
        msg = err.get("msg", "invalid value")
        if err.get("type") == "extra_forbidden" and loc and loc[0] == "body":
            known = _keys_at(body_model, loc[1:])
            if known is not None:
                msg = unknown_key_message(str(loc[-1]), known)
        details.append({"param": param, "message": msg})
    if not details:  # pragma: no cover - FastAPI always fills errors
        return InvalidInput("invalid request", param=None)
    return InvalidInput.from_problems(details)


def _body_model(request: Request) -> type[BaseModel] | None:
    """The pydantic model of the matched route's JSON body, if it has one."""
    field = getattr(request.scope.get("route"), "body_field", None)
    return _model_in(getattr(field, "type_", None) or getattr(getattr(field, "field_info", None), "annotation", None))


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(TuneserveError)
    async def _tuneserve(request: Request, exc: TuneserveError) -> JSONResponse:
        if exc.status_code >= 500:
            log.warning("request %s failed: %s (%s)", request.url.path, exc.message, exc.code)
        return response_for(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        return response_for(validation_error(exc, _body_model(request)))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        type_, code = _HTTP_TYPES.get(exc.status_code, ("server_error" if exc.status_code >= 500
                                                        else "invalid_request_error", None))
        message = exc.detail if isinstance(exc.detail, str) else "request failed"
        if exc.status_code == 404 and message == "Not Found":
            message = f"no route {request.method} {request.url.path}"
        return JSONResponse(error_body(message, type=type_, code=code), status_code=exc.status_code,
                            headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _unknown(request: Request, exc: Exception) -> JSONResponse:
        # Log the traceback here; the client gets no internals.
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return JSONResponse(error_body("internal server error", type="server_error", code="internal_error"),
                            status_code=500)


__all__ = ["install_error_handlers", "response_for", "error_body", "validation_error", "NotFound"]

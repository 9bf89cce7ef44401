"""POST /v1/chat/completions (OpenAI, stream or not) and POST /chat (ChatGLM3's model.chat)."""
from __future__ import annotations

import time
import uuid

from fastapi import APIRouter
from fastapi.responses import JSONResponse, StreamingResponse

from service.api.deps import EngineDep, SettingsDep, StateDep, TenantDep
from service.api.schemas import (
    ChatCompletionCreate,
    ChatMessageIn,
    SimpleChatCreate,
    SimpleChatResponse,
    Usage,
    error_responses,
)
from service.api.serving_chat import (
    completion_body,
    max_tokens_field,
    new_completion_id,
    open_stream,
    resolve_model,
    sampling_from,
    sse_chat,
    to_domain_messages,
)
from service.core.domain import BASE_ADAPTER, ChatMessage, GenerationRequest, SamplingParams
from service.core.errors import TuneserveError

router = APIRouter(tags=["chat"], responses=error_responses())

_SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


@router.post("/v1/chat/completions",
             responses={200: {"content": {"application/json": {}, "text/event-stream": {}}},
                        **error_responses(404, 409, 429, 504)})
async def chat_completions(body: ChatCompletionCreate, tenant: TenantDep, engine: EngineDep,
                           state: StateDep, settings: SettingsDep):
    adapter = await resolve_model(state, tenant, body.model)
    req = GenerationRequest(tenant=tenant, adapter=adapter, messages=to_domain_messages(body.messages),
                            params=sampling_from(body), request_id=uuid.uuid4().hex,
                            timeout_s=settings.request_timeout_s,
                            max_tokens_field=max_tokens_field(body))
    completion_id, created = new_completion_id(), int(time.time())
    started = time.perf_counter()
    is_adapter = adapter != BASE_ADAPTER
    if body.stream:
        try:
            stream = await open_stream(engine, req)
        except TuneserveError as exc:
            state.metrics.chat_errors.labels(exc.code or "error").inc()
            raise
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return StreamingResponse(
            sse_chat(state=state, stream=stream, completion_id=completion_id, created=created, model=body.model,
                     include_usage=include_usage, adapter=is_adapter, started=started),
            media_type="text/event-stream", headers=_SSE_HEADERS)
    try:
        result = await engine.generate(req)
    except TuneserveError as exc:
        state.metrics.chat_errors.labels(exc.code or "error").inc()
        raise
    state.metrics.observe_chat(adapter=is_adapter, stream=False, seconds=time.perf_counter() - started,
                               prompt_tokens=result.prompt_tokens, completion_tokens=result.completion_tokens)
    return JSONResponse(completion_body(completion_id=completion_id, created=created, model=body.model,
                                        result=result))


def _history_messages(history) -> tuple[list[ChatMessageIn], bool]:
    """(messages, pairs?) from either history shape."""
    if not history:
        return [], False
    if isinstance(history[0], ChatMessageIn):
        return list(history), False
    msgs: list[ChatMessageIn] = []
    for q, a in history:
        msgs.append(ChatMessageIn(role="user", content=q))
        msgs.append(ChatMessageIn(role="assistant", content=a))
    return msgs, True


@router.post("/chat", response_model=SimpleChatResponse, responses=error_responses(404, 409, 429, 504))
async def simple_chat(body: SimpleChatCreate, tenant: TenantDep, engine: EngineDep, state: StateDep,
                      settings: SettingsDep) -> SimpleChatResponse:
    adapter = await resolve_model(state, tenant, body.adapter or None, param="adapter")
    history, pairs = _history_messages(body.history)
    messages = to_domain_messages(history, param="history") + [ChatMessage(role="user", content=body.query)]
    params = SamplingParams(max_tokens=body.max_new_tokens, temperature=body.temperature, top_p=body.top_p,
                            seed=body.seed)
    req = GenerationRequest(tenant=tenant, adapter=adapter, messages=messages, params=params,
                            request_id=uuid.uuid4().hex, timeout_s=settings.request_timeout_s,
                            max_tokens_field="max_new_tokens" if "max_new_tokens" in body.model_fields_set else None)
    started = time.perf_counter()
    result = await engine.generate(req)
    state.metrics.observe_chat(adapter=adapter != BASE_ADAPTER, stream=False,
                               seconds=time.perf_counter() - started,
                               prompt_tokens=result.prompt_tokens, completion_tokens=result.completion_tokens)
    if pairs:
        new_history: list = [list(p) for p in body.history] + [[body.query, result.text]]
    else:
        new_history = [{"role": m.role, "content": m.content} for m in messages]
        new_history.append({"role": "assistant", "content": result.text})
    return SimpleChatResponse(
        response=result.text, history=new_history,
        usage=Usage(prompt_tokens=result.prompt_tokens, completion_tokens=result.completion_tokens,
                    total_tokens=result.prompt_tokens + result.completion_tokens),
        model=state.base_model_name if adapter == BASE_ADAPTER else adapter,
        finish_reason=result.finish_reason)

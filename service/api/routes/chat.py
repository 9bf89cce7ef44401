"""POST /v1/chat/completions (OpenAI, stream or not) and POST /chat (ChatGLM3's model.chat).
Parse, call service.api.serving_chat.ServingChat, return."""
from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse, StreamingResponse

from service.api.deps import ChatDep, TenantDep
from service.api.schemas import ChatCompletionCreate, SimpleChatCreate, SimpleChatResponse, error_responses

router = APIRouter(tags=["chat"], responses=error_responses())

_SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


@router.post("/v1/chat/completions",
             responses={200: {"content": {"application/json": {}, "text/event-stream": {}}},
                        **error_responses(404, 409, 429, 504)})
async def chat_completions(body: ChatCompletionCreate, tenant: TenantDep, chat: ChatDep):
    if body.stream:
        return StreamingResponse(await chat.completion_stream(body, tenant), media_type="text/event-stream",
                                 headers=_SSE_HEADERS)
    return JSONResponse((await chat.completion(body, tenant)).model_dump(mode="json"))


@router.post("/chat", response_model=SimpleChatResponse, responses=error_responses(404, 409, 429, 504))
async def simple_chat(body: SimpleChatCreate, tenant: TenantDep, chat: ChatDep) -> SimpleChatResponse:
    return await chat.simple_chat(body, tenant)

"""Chat logic between the thin routes and the engine: model resolution, message mapping,
OpenAI response/chunk shapes, SSE framing, metrics. (vLLM's `serving` layer.)"""
from __future__ import annotations

import json
import logging
import time
import uuid
from typing import Any, AsyncIterator

from anyio import to_thread

from service.api.deps import AppState
from service.api.errors import error_body
from service.api.schemas import ChatCompletionCreate, ChatMessageIn
from service.core.domain import BASE_ADAPTER, ChatMessage, GenerationRequest, GenerationResult, SamplingParams
from service.core.errors import InvalidInput, NotFound, TuneserveError

log = logging.getLogger("tuneserve.api.chat")

_ROLE_MAP = {"developer": "system", "tool": "observation"}


async def resolve_model(state: AppState, tenant: str, model: str | None, *, param: str = "model") -> str:
    """The adapter to use for `model`: BASE_ADAPTER for the base model's name, else the name of
    an adapter this tenant owns. Anything else (incl. another tenant's adapter) is a 404."""
    if not model or state.is_base_model(model) or model == BASE_ADAPTER:
        return BASE_ADAPTER
    try:
        await to_thread.run_sync(state.registry.resolve, tenant, model)
    except (NotFound, InvalidInput):
        # A name that cannot exist is as unknown as one that does not.
        raise NotFound(f"model {model!r} does not exist (base model: {state.base_model_name!r})",
                       param=param, code="model_not_found") from None
    return model


def to_domain_messages(messages: list[ChatMessageIn], param: str = "messages") -> list[ChatMessage]:
    out = []
    for i, m in enumerate(messages):
        if isinstance(m.content, list):
            text = "".join(p.text for p in m.content)
        elif m.content is None:
            if m.role != "assistant":
                raise InvalidInput(f"{param}[{i}].content is required", param=f"{param}[{i}].content")
            text = ""
        else:
            text = m.content
        out.append(ChatMessage(role=_ROLE_MAP.get(m.role, m.role), content=text))
    return out


def max_tokens_field(body: ChatCompletionCreate) -> str | None:
    """The field the client capped the reply with (the one sampling_from reads), or None."""
    if body.max_completion_tokens:
        return "max_completion_tokens"
    return "max_tokens" if body.max_tokens is not None else None


def sampling_from(body: ChatCompletionCreate) -> SamplingParams:
    kw: dict[str, Any] = {}
    max_tokens = body.max_completion_tokens or body.max_tokens
    if max_tokens is not None:
        kw["max_tokens"] = max_tokens
    for key in ("temperature", "top_p", "top_k", "repetition_penalty", "seed"):
        v = getattr(body, key)
        if v is not None:
            kw[key] = v
    if body.stop is not None:
        stop = [body.stop] if isinstance(body.stop, str) else list(body.stop)
        if len(stop) > 16:
            raise InvalidInput("stop: at most 16 sequences", param="stop")
        kw["stop"] = stop
    return SamplingParams(**kw)


def _finish(reason: str | None) -> str | None:
    # OpenAI knows stop/length; a cancelled/timeout generation ends as "stop" on the wire.
    if reason is None:
        return None
    return reason if reason in ("stop", "length") else "stop"


def completion_body(*, completion_id: str, created: int, model: str, result: GenerationResult) -> dict[str, Any]:
    return {
        "id": completion_id, "object": "chat.completion", "created": created, "model": model,
        "system_fingerprint": None,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": result.text, "refusal": None},
                     "finish_reason": _finish(result.finish_reason), "logprobs": None}],
        "usage": {"prompt_tokens": result.prompt_tokens, "completion_tokens": result.completion_tokens,
                  "total_tokens": result.prompt_tokens + result.completion_tokens},
    }


def _chunk(completion_id: str, created: int, model: str, delta: dict[str, Any], finish: str | None,
           usage: dict[str, int] | None = None, choices: bool = True) -> str:
    body: dict[str, Any] = {"id": completion_id, "object": "chat.completion.chunk", "created": created,
                            "model": model, "system_fingerprint": None,
                            "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}]
                            if choices else []}
    if usage is not None:
        body["usage"] = usage
    return "data: " + json.dumps(body, ensure_ascii=False, separators=(",", ":")) + "\n\n"


DONE = "data: [DONE]\n\n"


async def open_stream(engine: Any, req: GenerationRequest) -> Any:
    """Admit the request. The engine raises admission errors (queue full -> 429, unknown
    adapter -> 404, prompt too long -> 400, ...) here, before any header is sent, so they
    are proper HTTP statuses; the returned GenerationStream yields text deltas."""
    return await engine.stream(req)


async def sse_chat(*, state: AppState, stream: Any, completion_id: str, created: int, model: str,
                   include_usage: bool, adapter: bool, started: float) -> AsyncIterator[str]:
    """SSE frames: role delta, content deltas, the finish chunk, optional usage chunk, [DONE].
    If the client goes away, Starlette cancels this generator; `finally` closes the engine
    stream, which cancels the generation (its slot is freed at the next decode step)."""
    kind = "adapter" if adapter else "base"
    try:
        yield _chunk(completion_id, created, model, {"role": "assistant", "content": ""}, None)
        first = True
        async for delta in stream:
            if not delta:
                continue
            if first:
                first = False
                state.metrics.chat_ttft.labels(kind).observe(time.perf_counter() - started)
            yield _chunk(completion_id, created, model, {"content": delta}, None)
        usage = dict(stream.usage)
        yield _chunk(completion_id, created, model, {}, _finish(stream.finish_reason or "stop"))
        if include_usage:
            yield _chunk(completion_id, created, model, {}, None, choices=False, usage=usage)
        yield DONE
        state.metrics.observe_chat(adapter=adapter, stream=True, seconds=time.perf_counter() - started,
                                   prompt_tokens=usage["prompt_tokens"],
                                   completion_tokens=usage["completion_tokens"])
    except TuneserveError as exc:
        # Headers are gone: report in-band (the openai SDK raises on an `error` event).
        state.metrics.chat_errors.labels(exc.code or "error").inc()
        yield "data: " + json.dumps(exc.to_body(), ensure_ascii=False) + "\n\n"
        yield DONE
    except Exception:
        log.exception("chat stream %s failed", completion_id)
        state.metrics.chat_errors.labels("internal_error").inc()
        yield "data: " + json.dumps(error_body("internal server error", type="server_error",
                                               code="internal_error")) + "\n\n"
        yield DONE
    finally:
        await stream.aclose()


def new_completion_id() -> str:
    return "chatcmpl-" + uuid.uuid4().hex[:24]

"""The chat feature (vLLM's `serving` layer): `ServingChat` owns everything between the thin
routes and the engine: resolving `model` (one registry read per request), building the
GenerationRequest, timing, the chat metrics (each request and each error counted once,
here), and the typed wire responses (service.api.schemas) built from the engine's
GenerationResult. Streaming uses the engine's public API only (`await engine.stream(req)`)."""
from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from anyio import to_thread

from service.api.errors import error_body
from service.api.schemas import (
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionCreate,
    ChatDelta,
    ChatMessageIn,
    ChunkChoice,
    SimpleChatCreate,
    SimpleChatResponse,
    Usage,
    finish_reason,
)
from service.core.domain import BASE_ADAPTER, ChatMessage, GenerationRequest, GenerationResult, SamplingParams
from service.api.serving_jobs import job_id_as_model_hint
from service.core.errors import InvalidInput, NotFound, TuneserveError

if TYPE_CHECKING:
    from service.api.deps import AppState

log = logging.getLogger("tuneserve.api.chat")

_ROLE_MAP = {"developer": "system", "tool": "observation"}
DONE = "data: [DONE]\n\n"


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


def _history_messages(history) -> tuple[list[ChatMessageIn], bool]:
    """(messages, pairs?) from either of /chat's history shapes."""
    if not history:
        return [], False
    if isinstance(history[0], ChatMessageIn):
        return list(history), False
    msgs: list[ChatMessageIn] = []
    for q, a in history:
        msgs.append(ChatMessageIn(role="user", content=q))
        msgs.append(ChatMessageIn(role="assistant", content=a))
    return msgs, True


def new_completion_id() -> str:
    return "chatcmpl-" + uuid.uuid4().hex[:24]


class ServingChat:
    """One per request (cheap): the app's engine, registry, base identity, metrics, settings."""

    def __init__(self, state: "AppState", engine: Any):
        self.engine = engine
        self.registry = state.registry
        self.store = state.store
        self.base = state.base_model
        self.metrics = state.metrics
        self.timeout_s = state.settings.request_timeout_s

    # -- request building ------------------------------------------------------------------
    async def resolve_model(self, tenant: str, model: str | None, *, param: str = "model") -> tuple[str, int | None]:
        """(adapter, version) for `model`: (BASE_ADAPTER, None) for any name of the base model,
        else an adapter this tenant owns and its latest version, looked up once here and
        handed to the engine. Anything else (incl. another tenant's adapter) is a 404."""
        if self.base.is_base(model):
            return BASE_ADAPTER, None
        try:
            version = await to_thread.run_sync(self.registry.latest_version, tenant, model)
        except (NotFound, InvalidInput):  # a name that cannot exist is as unknown as one that does not
            version = None
        if version is None:
            hint = await to_thread.run_sync(job_id_as_model_hint, self.store, tenant, model)
            raise NotFound(f"model {model!r} does not exist (base model: {self.base.public_id!r})"
                           + (f"; {hint}" if hint else ""), param=param, code="model_not_found")
        return model, version

    def _request(self, tenant: str, adapter: tuple[str, int | None], messages: list[ChatMessage],
                 params: SamplingParams, max_tokens_field: str | None) -> GenerationRequest:
        return GenerationRequest(tenant=tenant, adapter=adapter[0], adapter_version=adapter[1], messages=messages,
                                 params=params, request_id=uuid.uuid4().hex, timeout_s=self.timeout_s,
                                 max_tokens_field=max_tokens_field)

    # -- metrics (the one place chat is counted) -------------------------------------------
    def _count_error(self, exc: BaseException) -> None:
        code = (exc.code or "error") if isinstance(exc, TuneserveError) else "internal_error"
        self.metrics.chat_errors.labels(code).inc()

    def _observe(self, req: GenerationRequest, *, stream: bool, started: float, prompt_tokens: int,
                 completion_tokens: int) -> None:
        self.metrics.observe_chat(adapter=req.adapter != BASE_ADAPTER, stream=stream,
                                  seconds=time.perf_counter() - started, prompt_tokens=prompt_tokens,
                                  completion_tokens=completion_tokens)

    async def _generate(self, req: GenerationRequest) -> GenerationResult:
        started = time.perf_counter()
        try:
            result = await self.engine.generate(req)
        except TuneserveError as exc:
            self._count_error(exc)
            raise
        self._observe(req, stream=False, started=started, prompt_tokens=result.prompt_tokens,
                      completion_tokens=result.completion_tokens)
        return result

    # -- POST /v1/chat/completions ----------------------------------------------------------
    async def chat_request(self, body: ChatCompletionCreate, tenant: str) -> GenerationRequest:
        adapter = await self.resolve_model(tenant, body.model)
        return self._request(tenant, adapter, to_domain_messages(body.messages), sampling_from(body),
                             max_tokens_field(body))

    async def completion(self, body: ChatCompletionCreate, tenant: str) -> ChatCompletion:
        req = await self.chat_request(body, tenant)
        completion_id, created = new_completion_id(), int(time.time())
        result = await self._generate(req)
        return ChatCompletion.from_domain(result, id=completion_id, created=created, model=body.model)

    async def completion_stream(self, body: ChatCompletionCreate, tenant: str) -> AsyncIterator[str]:
        """Admit now, so admission errors (queue full -> 429, unknown adapter -> 404, prompt too
        long -> 400, ...) raise before any header is sent; then the SSE frames."""
        req = await self.chat_request(body, tenant)
        completion_id, created = new_completion_id(), int(time.time())
        started = time.perf_counter()
        try:
            stream = await self.engine.stream(req)
        except TuneserveError as exc:
            self._count_error(exc)
            raise
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return self._sse(req, stream, completion_id=completion_id, created=created, model=body.model,
                         include_usage=include_usage, started=started)

    async def _sse(self, req: GenerationRequest, stream: Any, *, completion_id: str, created: int, model: str,
                   include_usage: bool, started: float) -> AsyncIterator[str]:
        """Role delta, content deltas, the finish chunk, optional usage chunk, [DONE]. If the
        client goes away, Starlette cancels this generator; `finally` closes the engine stream,
        which cancels the generation (its slot is freed at the next decode step)."""
        def chunk(delta: ChatDelta | None = None, finish: str | None = None, usage: Usage | None = None) -> str:
            choices = [ChunkChoice(delta=delta, finish_reason=finish)] if delta is not None else []
            return ChatCompletionChunk(id=completion_id, created=created, model=model, choices=choices,
                                       usage=usage).sse()

        kind = "adapter" if req.adapter != BASE_ADAPTER else "base"
        try:
            yield chunk(ChatDelta(role="assistant", content=""))
            first = True
            async for delta in stream:
                if not delta:
                    continue
                if first:
                    first = False
                    self.metrics.chat_ttft.labels(kind).observe(time.perf_counter() - started)
                yield chunk(ChatDelta(content=delta))
            usage = Usage.of(stream.usage["prompt_tokens"], stream.usage["completion_tokens"])
            yield chunk(ChatDelta(), finish_reason(stream.finish_reason or "stop"))
            if include_usage:
                yield chunk(usage=usage)
            yield DONE
            self._observe(req, stream=True, started=started, prompt_tokens=usage.prompt_tokens,
                          completion_tokens=usage.completion_tokens)
        except TuneserveError as exc:
            # Headers are gone: report in-band (the openai SDK raises on an `error` event).
            self._count_error(exc)
            yield "data: " + json.dumps(exc.to_body(), ensure_ascii=False) + "\n\n"
            yield DONE
        except Exception as exc:
            log.exception("chat stream %s failed", completion_id)
            self._count_error(exc)
            yield "data: " + json.dumps(error_body("internal server error", type="server_error",
                                                   code="internal_error")) + "\n\n"
            yield DONE
        finally:
            await stream.aclose()

    # -- POST /chat (ChatGLM3's model.chat) -------------------------------------------------
    async def simple_chat(self, body: SimpleChatCreate, tenant: str) -> SimpleChatResponse:
        adapter = await self.resolve_model(tenant, body.adapter or None, param="adapter")
        history, pairs = _history_messages(body.history)
        messages = to_domain_messages(history, param="history") + [ChatMessage(role="user", content=body.query)]
        params = SamplingParams(max_tokens=body.max_new_tokens, temperature=body.temperature, top_p=body.top_p,
                                seed=body.seed)
        req = self._request(tenant, adapter, messages, params,
                            "max_new_tokens" if "max_new_tokens" in body.model_fields_set else None)
        result = await self._generate(req)
        if pairs:
            new_history: list = [list(p) for p in body.history] + [[body.query, result.text]]
        else:
            new_history = [{"role": m.role, "content": m.content} for m in messages]
            new_history.append({"role": "assistant", "content": result.text})
        return SimpleChatResponse(response=result.text, history=new_history, usage=Usage.from_domain(result),
                                  model=self.base.public_id if req.adapter == BASE_ADAPTER else req.adapter,
                                  finish_reason=result.finish_reason)

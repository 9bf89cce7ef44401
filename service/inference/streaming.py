"""The consumer side of one request: token ids in, text deltas out.

Detokenization and stop-string search run here, on the caller's event loop, not in the
decode thread, so the GPU loop only moves token ids.
"""
from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING, Any

from service.core.domain import GenerationResult
from service.core.errors import RequestTimeout, TuneserveError

if TYPE_CHECKING:
    from service.inference.engine import _Request

# Events the decode thread sends (per request, in order).
TOKEN, END, ERROR = "token", "end", "error"


class TextTracker:
    """Incremental detokenization with stop strings.

    Decoding is windowed (as vLLM's detokenizer): each new token decodes only the ids since
    the last stable point, twice (with and without the new token), and the difference is the
    new text. Earlier text is never re-decoded, so what was sent is never contradicted and
    the concatenated deltas are the answer. A window ending in U+FFFD (an incomplete UTF-8
    byte sequence) waits for the next token. Tail text that could be the start of a stop
    string is held back; text is cut at the first complete stop string.
    """

    def __init__(self, tokenizer, stop: list[str], *, chatglm3_reply: bool = False):
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        self._max_stop = max(map(len, self.stop), default=0)
        self.ids: list[int] = []
        self._prefix_offset = 0
        self._read_offset = 0
        self.text = ""     # stable decoded text so far
        self.emitted = ""  # text handed out (after the reply head is dropped)
        self.stopped = False
        # ChatGLM3 replies start with a metadata line ("" for plain chat, then "\n"); the
        # original chat() drops an empty one and strips the content. None = not decided yet.
        self._skip: int | None = None if chatglm3_reply else 0

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True) if ids else ""

    def _stable_delta(self, final: bool) -> str:
        prefix = self._decode(self.ids[self._prefix_offset:self._read_offset])
        new = self._decode(self.ids[self._prefix_offset:])
        if len(new) > len(prefix) and (final or not new.endswith("\ufffd")):
            self._prefix_offset, self._read_offset = self._read_offset, len(self.ids)
            return new[len(prefix):]
        return ""

    def push(self, token_id: int) -> str:
        if self.stopped:
            return ""
        self.ids.append(token_id)
        self.text += self._stable_delta(final=False)
        return self._release(final=False)

    def flush(self) -> str:
        if self.stopped:
            return ""
        self.text += self._stable_delta(final=True)
        return self._release(final=True)

    def _visible(self, final: bool) -> str | None:
        """Text after the reply head, or None while the head is still undecided."""
        if self._skip is None:
            nl = self.text.find("\n")
            if nl < 0:
                # No head after a few tokens (e.g. an adapter trained on the plain format):
                # there is none; never hold a whole answer back.
                if not final and len(self.ids) < 8:
                    return None
                self._skip = len(self.text) - len(self.text.lstrip())
            elif self.text[:nl].strip():  # real metadata (a tool call): keep the raw text
                self._skip = 0
            else:
                rest = self.text[nl + 1:]
                content = rest.lstrip()
                if not content and not final:
                    return None
                self._skip = nl + 1 + len(rest) - len(content)
        return self.text[self._skip:]

    def _release(self, final: bool) -> str:
        text = self._visible(final)
        if text is None:
            return ""
        safe = len(text)
        if self.stop:
            start = max(0, len(self.emitted) - self._max_stop + 1)
            hits = [i for i in (text.find(s, start) for s in self.stop) if i >= 0]
            if hits:
                self.stopped = True
                safe = min(hits)
                text = text[:safe]
            elif not final:
                for s in self.stop:  # longest tail that is a proper prefix of a stop string
                    for k in range(min(len(s) - 1, len(text)), 0, -1):
                        if text.endswith(s[:k]):
                            safe = min(safe, len(text) - k)
                            break
        delta = text[len(self.emitted):max(safe, len(self.emitted))]
        self.emitted += delta
        return delta


class GenerationStream:
    """Async iterator of text deltas for one request; the final state stays on it.

    Two equivalent ways to use it (`engine.stream(request)` returns it unadmitted):

        stream = await engine.stream(request)   # admits now: admission errors raise here
        async for delta in stream: ...           # real per-token text deltas
        stream.result                            # GenerationResult: text, finish_reason, usage

        async for delta in engine.stream(request): ...  # admits on the first __anext__

    Admission errors: ServiceUnavailable, QueueFull (retry_after), InvalidInput, NotFound,
    AdapterMismatch, IntegrityError, RequestTimeout (adapter not loaded in time).
    Closing it early (`await stream.aclose()`, `async with`, or cancelling / ending the task
    that iterates it, as a client disconnect does) cancels the request: the decode loop
    frees its slot at the next step boundary. A timeout before any token raises
    RequestTimeout from iteration; after tokens, the stream ends with finish_reason "timeout".
    """

    def __init__(self, engine, request):
        self._engine = engine
        self.request = request  # the GenerationRequest
        self._req: "_Request | None" = None
        self._admitting: asyncio.Future | None = None
        self._text: TextTracker | None = None
        self._done = False
        self.finish_reason: str | None = None
        self.completion_tokens = 0
        self.created_at = time.monotonic()
        self.first_token_at: float | None = None
        self._task: asyncio.Task | None = None

    # --- admission --------------------------------------------------------------------
    async def admit(self) -> "GenerationStream":
        if self._req is None:
            if self._done:
                raise RuntimeError("stream was closed before it was admitted")
            if self._admitting is None:
                self._admitting = asyncio.ensure_future(self._engine.admit(self.request))
            req = await asyncio.shield(self._admitting)
            if self._req is None:
                self._req = req
                self._text = TextTracker(self._engine.tokenizer, req.params.stop,
                                         chatglm3_reply=self._engine.chatglm3_replies)
                if self._done:  # closed while admission was under way
                    self._engine.cancel(req)
        return self

    def __await__(self):
        return self.admit().__await__()

    # --- public state -----------------------------------------------------------------
    @property
    def request_id(self) -> str | None:
        return self._req.id if self._req else self.request.request_id

    @property
    def adapter(self) -> str:
        return self._req.adapter if self._req else self.request.adapter

    @property
    def adapter_version(self) -> int | None:
        return self._req.adapter_version if self._req else None

    @property
    def prompt_tokens(self) -> int:
        return len(self._req.prompt_ids) if self._req else 0

    @property
    def text(self) -> str:
        return self._text.emitted if self._text else ""

    @property
    def token_ids(self) -> list[int]:
        """Generated token ids so far (stop tokens excluded)."""
        return list(self._text.ids) if self._text else []

    @property
    def done(self) -> bool:
        return self._done

    @property
    def usage(self) -> dict[str, int]:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens}

    @property
    def result(self) -> GenerationResult | None:
        """Set once the stream has ended normally (None before, or after an error)."""
        if not self._done or self.finish_reason is None:
            return None
        return GenerationResult(text=self.text, finish_reason=self.finish_reason,
                                prompt_tokens=self.prompt_tokens,
                                completion_tokens=self.completion_tokens,
                                adapter=self.adapter, adapter_version=self.adapter_version)

    # --- iteration --------------------------------------------------------------------
    def __aiter__(self):
        return self

    async def __anext__(self) -> str:
        if self._done:
            raise StopAsyncIteration
        if self._task is None:
            # A consumer cancelled outside __anext__ (e.g. while sending a chunk to a client
            # that went away) never reaches our except below; its task ending does.
            self._task = asyncio.current_task()
            if self._task is not None:
                self._task.add_done_callback(self._on_consumer_done)
        if self._req is None:
            try:
                await self.admit()
            except BaseException:
                self._done = True
                raise
        queue = self._req.queue
        while not self._done:
            try:
                event = await queue.get()
            except BaseException:  # cancelled consumer = client gone
                self._abort()
                raise
            kind = event[0]
            if kind == TOKEN:
                if self.first_token_at is None:
                    self.first_token_at = time.monotonic()
                self.completion_tokens += 1
                delta = self._text.push(event[1])
                if self._text.stopped:
                    self._finish("stop")
                    self._engine.cancel(self._req)  # free the slot; we have what we need
                if delta:
                    return delta
            elif kind == END:
                reason, n_stop = event[1], event[2]
                self.completion_tokens += n_stop  # a stop token counts, its text is not shown
                delta = self._text.flush()
                self._finish(reason)
                if reason == "timeout" and self.completion_tokens == 0:
                    raise RequestTimeout("request timed out before the first token")
                if delta:
                    return delta
            elif kind == ERROR:
                self._finish("error")
                exc = event[1]
                raise exc if isinstance(exc, BaseException) else TuneserveError(str(exc))
        raise StopAsyncIteration

    def _on_consumer_done(self, _task) -> None:
        self._abort()

    def _finish(self, reason: str) -> None:
        if not self._done:
            self._done = True
            self.finish_reason = reason if reason != "error" else None

    def _abort(self) -> None:
        if not self._done:
            self._finish("cancelled")
            if self._req is not None:
                self._engine.cancel(self._req)

    async def aclose(self) -> None:
        self._abort()

    async def __aenter__(self) -> "GenerationStream":
        return await self.admit()

    async def __aexit__(self, *exc: Any) -> None:
        self._abort()

    def __del__(self):  # a stream dropped without being finished must not hold a slot
        if not getattr(self, "_done", True) and getattr(self, "_req", None) is not None:
            try:
                self._engine.cancel(self._req)
            except Exception:
                pass

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

    Each step decodes all generated ids (so the concatenated deltas always equal the final
    decode, including SentencePiece's leading-space rules), holds back an incomplete UTF-8
    tail (U+FFFD at the end) and any tail that could be the start of a stop string, and
    trims at the first complete stop string.
    """

    def __init__(self, tokenizer, stop: list[str]):
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        self.ids: list[int] = []
        self.emitted = ""  # text already handed out
        self.stopped = False

    def _decode(self) -> str:
        return self.tokenizer.decode(self.ids, skip_special_tokens=True)

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        text = self._decode()
        if self.stop:
            start = max(0, len(self.emitted) - max(map(len, self.stop)) + 1)
            hits = [i for i in (text.find(s, start) for s in self.stop) if i >= 0]
            if hits:
                self.stopped = True
                return self._advance(text[: min(hits)])
        if text.endswith("\ufffd"):
            text = text.rstrip("\ufffd")
        hold = 0
        for s in self.stop:  # longest tail of text that is a proper prefix of a stop string
            for k in range(min(len(s) - 1, len(text)), hold, -1):
                if text.endswith(s[:k]):
                    hold = k
                    break
        return self._advance(text[: len(text) - hold])

    def flush(self) -> str:
        return "" if self.stopped else self._advance(self._decode())

    def _advance(self, text: str) -> str:
        if len(text) <= len(self.emitted) or not text.startswith(self.emitted):
            # Nothing new, or the decoder rewrote earlier text (never seen with our
            # tokenizers); never take back what was sent.
            return "" if len(text) <= len(self.emitted) else text[len(self.emitted):]
        delta = text[len(self.emitted):]
        self.emitted = text
        return delta


class GenerationStream:
    """Async iterator of text deltas for one request; the final state stays on it.

        stream = await engine.stream(request)   # admission errors raise here (429/404/409/...)
        async for delta in stream:              # real per-token text deltas
            ...
        stream.result                           # GenerationResult (finish_reason, usage, text)

    Closing it early (`await stream.aclose()`, `async with`, or cancelling the task that
    iterates it, as a client disconnect does) cancels the request: the decode loop frees
    its slot at the next step boundary. A timeout before any token raises RequestTimeout
    from iteration; after tokens, the stream ends with finish_reason "timeout".
    """

    def __init__(self, engine, req: "_Request", tokenizer):
        self._engine = engine
        self._req = req
        self._queue: asyncio.Queue = req.queue
        self._text = TextTracker(tokenizer, req.params.stop)
        self._done = False
        self.finish_reason: str | None = None
        self.completion_tokens = 0
        self.first_token_at: float | None = None
        self.created_at = time.monotonic()

    # --- public state -----------------------------------------------------------------
    @property
    def request_id(self) -> str:
        return self._req.id

    @property
    def adapter(self) -> str:
        return self._req.adapter

    @property
    def adapter_version(self) -> int | None:
        return self._req.adapter_version

    @property
    def prompt_tokens(self) -> int:
        return len(self._req.prompt_ids)

    @property
    def text(self) -> str:
        return self._text.emitted

    @property
    def done(self) -> bool:
        return self._done

    @property
    def usage(self) -> dict[str, int]:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens}

    @property
    def result(self) -> GenerationResult | None:
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
        while not self._done:
            try:
                event = await self._queue.get()
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
                    self._engine._cancel(self._req)  # free the slot; we have what we need
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

    def _finish(self, reason: str) -> None:
        if not self._done:
            self._done = True
            self.finish_reason = reason if reason != "error" else None

    def _abort(self) -> None:
        if not self._done:
            self._finish("cancelled")
            self._engine._cancel(self._req)

    async def aclose(self) -> None:
        self._abort()

    async def __aenter__(self) -> "GenerationStream":
        return self

    async def __aexit__(self, *exc: Any) -> None:
        self._abort()

    def __del__(self):  # a stream dropped without being finished must not hold a slot
        if not getattr(self, "_done", True):
            try:
                self._engine._cancel(self._req)
            except Exception:
                pass

"""InferenceEngine: one owner of the base model, continuous batching of mixed adapters.

Threads and ownership:
* the caller's asyncio loop (front end): renders the chat, checks the queue bound,
  acquires the adapter (loading it if needed), submits the request and turns the token
  ids it receives into text deltas (`GenerationStream`);
* adapter loader threads: registry read, sha256 verify, base/target checks, parsing;
* one decode thread: the only code that touches the model and GPU tensors. Each
  iteration: upload newly loaded adapters, drop cancelled / timed-out requests, prefill
  waiting requests into free slots (one padded batch), then one decode step for every
  running slot, whatever adapter each uses. Finished requests leave their slot at once.
  Steps are pipelined: step N+1 is launched (its input ids are already on the device)
  before the host waits for step N's ids, which arrive in pinned memory without a sync;
  so the host's per-token work (emitting, detokenizing) overlaps the GPU's next step. A row
  that ended at step N costs one wasted row in step N+1, whose output is dropped.
  A failure ends only its own request: a batched prefill that raises is redone request by
  request, a decode step that raises is redone on halves of its rows (then quarters, ...).
  (Host-side errors only: on CUDA a device-side assert poisons the context for everyone, so
  admission keeps positions inside the model's table instead.)

Usage (see GenerationStream for the streaming contract):

    engine = InferenceEngine(settings, registry)
    await engine.start()
    result = await engine.generate(GenerationRequest(tenant="t", adapter="ft-x", messages=[...]))
    stream = await engine.stream(request)     # admitted here (errors raise here)
    async for delta in stream: ...            # text deltas, one per token that adds text
    stream.result.finish_reason, stream.usage
    await engine.stop()
"""
from __future__ import annotations

import asyncio
import collections
import heapq
import itertools
import logging
import secrets
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from service.core.config import Settings
from service.core.domain import BASE_ADAPTER, GenerationRequest, GenerationResult, SamplingParams
from service.core.errors import InvalidInput, QueueFull, ServiceUnavailable
from service.core.identity import BaseModelIdentity, chosen_ref
from service.core.identity import demo_dir as identity_demo_dir
from service.inference.adapters import AdapterCache, AdapterLease, BaseIdentity
from service.inference.streaming import END, ERROR, TOKEN, GenerationStream

log = logging.getLogger(__name__)


@dataclass(eq=False)
class _Request:
    id: str
    tenant: str
    adapter: str  # adapter name, or BASE_ADAPTER
    adapter_version: int | None
    lease: AdapterLease | None
    prompt_ids: list[int]
    params: SamplingParams
    seed: int
    deadline: float
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    created: float = field(default_factory=time.monotonic)
    cancelled: bool = False
    finished: bool = False
    slot: int | None = None
    n_generated: int = 0  # tokens delivered to the host
    n_launched: int = 0   # tokens whose computation was launched (>= n_generated)


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


class InferenceEngine:
    # Padded prompt tokens one prefill batch may hold (bounds the pause a join causes).
    prefill_tokens_per_batch = 4096

    def __init__(self, settings: Settings, registry, *, base_model_ref: str | None = None,
                 device: str | None = None, lora_targets: list[str] | str | None = None):
        self.settings = settings
        self.registry = registry
        self._ref = base_model_ref if base_model_ref is not None else settings.base_model
        self._device_pref = device or settings.device
        self._lora_targets = lora_targets
        self.identity = BaseModelIdentity.of(self._ref or chosen_ref(settings, has_cuda=_has_cuda()), settings)
        self.base_model_name: str = self.identity.public_id
        self.device: str | None = None
        self.model_path: Path | None = None
        self.tokenizer = None
        self.chatglm3_replies = False  # replies open with ChatGLM3's metadata line
        # Tokens (prompt + reply) one request may hold: TUNESERVE_MAX_SEQ_LEN, lowered to the base
        # model's position limit at setup (past it GPT-2's position table indexes out of range,
        # a device-side assert on CUDA that kills the process: admission makes it unreachable).
        self.max_seq_len = settings.max_seq_len
        self._runner = None
        self._cache: AdapterCache | None = None
        self._stop_ids: frozenset[int] = frozenset()
        self._thread: threading.Thread | None = None
        self._wake = threading.Event()
        self._lock = threading.Lock()
        self._inbox: collections.deque[_Request] = collections.deque()
        self._waiting: collections.deque[_Request] = collections.deque()
        self._running: dict[int, _Request] = {}
        self._free: list[int] = []
        self._pending = 0  # accepted, not yet in a slot (loading adapter or waiting)
        self._outbox: dict[asyncio.AbstractEventLoop, list] = {}
        self._stopping = False
        self._started = False
        self._failed: BaseException | None = None
        self._ids = itertools.count(1)
        self._avg_request_s = 2.0
        self._slot_tensors: dict[tuple[int, ...], Any] = {}
        self._inflight: _Step | None = None  # launched decode step whose ids are not read yet
        self._step_no = 0
        self.counters = collections.Counter()
        self.step_times = StepTimes()

    def _load_ref(self) -> str:
        """The identity's ref; the demo model is built on first use (as the launcher does)."""
        ref = self.identity.ref
        demo = identity_demo_dir(self.settings)
        if Path(ref).absolute() == demo and not (demo / "config.json").exists():
            from service.models import build_demo_model
            ref = str(build_demo_model(demo))
        return ref

    # ----------------------------------------------------------------------------------
    # lifecycle
    # ----------------------------------------------------------------------------------
    async def start(self) -> None:
        if self._started:
            return
        self._stopping = False
        if self._runner is None:
            await asyncio.to_thread(self._setup)
        if str(self.device).startswith("cuda"):
            # The decode thread waits for the GPU without the GIL; with the default 5 ms switch
            # interval, getting it back from busy front-end threads (detokenizing 32 streams)
            # can cost more than a whole decode step.
            sys.setswitchinterval(min(sys.getswitchinterval(), 0.0005))
        self._thread = threading.Thread(target=self._run, name="decode-loop", daemon=True)
        self._thread.start()
        self._started = True
        for ref in self.settings.preload_adapters:
            await self._preload(ref)

    def _setup(self) -> None:
        from service import models

        settings = self.settings
        try:  # the trainer's resolution (device rule, targets, fingerprint): what it trains, this serves
            self.identity = models.resolve_identity(self.identity.with_files(ref=self._load_ref()),
                                                    settings.models_dir, device=self._device_pref)
        except InvalidInput as exc:
            if exc.param != "device":
                raise
            raise ServiceUnavailable(exc.message) from exc
        self.device = self.identity.device
        path = Path(self.identity.path)
        self.model_path = path
        self.tokenizer = models.load_tokenizer(path)
        model = models.load_model(path, quantize_4bit=settings.load_in_4bit, device=self.device)
        self._setup_with(model, self.tokenizer, path, stop_ids=models.stop_token_ids(self.tokenizer),
                         default_targets=list(self.identity.default_targets), fingerprint=self.identity.fingerprint)

    def _setup_with(self, model, tokenizer, path: Path, *, stop_ids, default_targets,
                    fingerprint: str | None) -> None:
        """Build runner + adapter cache around an already loaded model (also used by tests)."""
        import torch

        from service.inference.runner import ModelRunner
        from service.models import position_limit

        settings = self.settings
        self.device = self.device or str(next(model.parameters()).device)
        limit = self.identity.position_limit if self.identity.resolved else position_limit(model.config)
        self.max_seq_len = min(settings.max_seq_len, limit or settings.max_seq_len)
        self.tokenizer = tokenizer
        self.model_path = Path(path)
        from service.models.chatglm3 import is_chatglm3_tokenizer
        self.chatglm3_replies = is_chatglm3_tokenizer(tokenizer)
        targets = self._lora_targets or default_targets
        runner = ModelRunner(
            model, num_slots=settings.max_batch_size, max_seq_len=self.max_seq_len,
            lora_targets=targets, lora_budget_bytes=settings.adapter_gpu_budget_bytes,
            device=torch.device(self.device), cuda_graphs=getattr(settings, "cuda_graphs", True),
            torch_compile=getattr(settings, "torch_compile", False), nf4_kernels=settings.nf4_kernels,
            nf4_kernel_rows=(settings.nf4_kernel_min_rows, settings.nf4_kernel_max_rows),
            lora_kernels=settings.lora_kernels,
            fused_ops=settings.fused_ops and torch.device(self.device).type == "cuda",
            decode_attention_kernel=settings.decode_attention_kernel and torch.device(self.device).type == "cuda")
        self._runner = runner
        self._stop_ids = frozenset(int(i) for i in stop_ids)
        self._free = list(range(settings.max_batch_size))
        heapq.heapify(self._free)
        served = {n.rsplit(".", 1)[-1] for n in runner.wrapped}
        # Older manifests recorded the raw ref (maybe a path): its spellings still match.
        names = set(self.identity.names) | {Path(self.identity.ref).name, str(path), Path(path).name,
                                            str(getattr(model.config, "_name_or_path", "") or "")}
        identity = BaseIdentity(names, fingerprint, served)
        self._cache = AdapterCache(
            self.registry, identity, shapes=runner.shapes, pool_dtype=runner.dtype,
            capacity_columns=runner.capacity, bytes_per_column=runner.bytes_per_column,
            cpu_capacity=settings.adapter_cpu_cache_size, wake=self._wake.set,
            pin_memory=runner.device.type == "cuda", loader_threads=settings.adapter_loader_threads)
        log.info("inference engine: base %s on %s, %d slots x %d tokens, LoRA on %s "
                 "(%d rank columns = %d bytes)", self.base_model_name, self.device,
                 settings.max_batch_size, self.max_seq_len, sorted(served), runner.capacity,
                 runner.capacity * runner.bytes_per_column)

    async def _preload(self, ref: str) -> None:
        tenant, sep, name = ref.partition("/")
        if not sep:
            log.warning("preload_adapters entry %r is not tenant/name; skipped", ref)
            return
        try:
            lease = await self._cache.acquire(tenant, name, time.monotonic() + 600)
        except Exception as exc:
            log.warning("preloading adapter %s failed: %s", ref, exc)
            return
        self._cache.pin(lease.entry.key)
        lease.release()

    def evict_adapter(self, tenant: str, name: str) -> None:
        """Free a deleted adapter's memory now rather than when LRU pressure reaches it."""
        if self._cache is not None:
            self._cache.forget(tenant, name)

    async def stop(self) -> None:
        self._stopping = True
        self._wake.set()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, 30)
        self._thread = None
        self._started = False
        if self._cache is not None:
            self._cache.shutdown()

    def ready(self) -> bool:
        return (self._started and not self._stopping and self._failed is None
                and self._thread is not None and self._thread.is_alive())

    # ----------------------------------------------------------------------------------
    # front end
    # ----------------------------------------------------------------------------------
    def _is_base(self, adapter: str | None) -> bool:
        return self.identity.is_base(adapter)

    def stream(self, req: GenerationRequest) -> GenerationStream:
        """The request as a stream of text deltas. `await engine.stream(req)` admits it at
        once (so QueueFull / NotFound / AdapterMismatch / ... raise there, before anything is
        sent); iterating an unawaited stream admits it on the first step. See
        GenerationStream for the final state (result, finish_reason, usage)."""
        return GenerationStream(self, req)

    async def admit(self, req: GenerationRequest) -> _Request:
        """Queue `req` (rendered, adapter acquired); its events arrive on the returned
        request's queue. GenerationStream is the consumer; raises the admission errors."""
        if not self.ready():
            raise ServiceUnavailable("inference engine is not ready" +
                                     (f": {self._failed}" if self._failed else ""))
        with self._lock:
            if self._pending >= self.settings.max_queue:
                self.counters["rejected_queue_full"] += 1
                raise QueueFull(f"{self._pending} requests are waiting; retry later",
                                retry_after=self._retry_after())
            self._pending += 1
        lease = None
        try:
            prompt = self._render(req)
            timeout = req.timeout_s if req.timeout_s is not None else self.settings.request_timeout_s
            deadline = time.monotonic() + max(0.0, timeout)
            adapter = BASE_ADAPTER if self._is_base(req.adapter) else req.adapter
            if adapter != BASE_ADAPTER:
                lease = await self._cache.acquire(req.tenant, adapter, deadline, req.adapter_version)
            r = _Request(
                id=req.request_id or f"gen-{uuid.uuid4().hex[:16]}", tenant=req.tenant, adapter=adapter,
                adapter_version=lease.entry.version if lease else None, lease=lease,
                prompt_ids=prompt, params=req.params,
                seed=req.params.seed if req.params.seed is not None else secrets.randbits(63),
                deadline=deadline, loop=asyncio.get_running_loop())
            if not self.ready():
                raise ServiceUnavailable("inference engine stopped")
        except BaseException:
            with self._lock:
                self._pending -= 1
            if lease is not None:
                lease.release()
            raise
        self.counters["requests"] += 1
        self._inbox.append(r)
        self._wake.set()
        return r

    async def generate(self, req: GenerationRequest) -> GenerationResult:
        """Whole answer. Raises what stream() raises, and RequestTimeout when the request
        timed out before its first token (after it: finish_reason "timeout")."""
        stream = await self.stream(req)  # admission errors raise here
        try:
            async for _ in stream:
                pass
        finally:
            await stream.aclose()
        return stream.result

    def _render(self, req: GenerationRequest) -> list[int]:
        from service import models

        if not req.messages:
            raise InvalidInput("messages must not be empty", param="messages")
        messages = [{"role": m.role, "content": m.content} for m in req.messages]
        ids = [int(i) for i in models.render_chat(self.tokenizer, messages, add_generation_prompt=True)]
        if len(ids) >= self.max_seq_len:
            raise InvalidInput(f"prompt is {len(ids)} tokens; this server accepts at most "
                               f"{self.max_seq_len - 1}", param="messages",
                               code="context_length_exceeded")
        asked = req.params.max_tokens
        if req.max_tokens_field and len(ids) + asked > self.max_seq_len:
            raise InvalidInput(f"this server's context is {self.max_seq_len} tokens, but the prompt "
                               f"is {len(ids)} tokens and {req.max_tokens_field} asks for {asked} more",
                               param=req.max_tokens_field, code="context_length_exceeded")
        return ids

    def _retry_after(self) -> float:
        slots = max(1, self.settings.max_batch_size)
        return float(max(1, round(self._avg_request_s * (1 + self._pending / slots))))

    def cancel(self, r: _Request) -> None:
        """Stop `r` (no-op once finished); the decode thread frees its slot next iteration."""
        if not r.finished:
            r.cancelled = True
            self._wake.set()

    # ----------------------------------------------------------------------------------
    # decode thread
    # ----------------------------------------------------------------------------------
    def _run(self) -> None:
        import torch

        try:
            with torch.inference_mode():
                while not self._stopping:
                    self._wake.clear()
                    while self._inbox:
                        self._waiting.append(self._inbox.popleft())
                    uploads, prefills = self._cache.counters["uploads"], self.counters["prefill_batches"]
                    self._cache.service_uploads(self._runner)
                    self._reap(time.monotonic())
                    self._admit()
                    launched = self._launch() if self._running else None
                    if self._inflight is not None:
                        self._complete(self._inflight)
                    self.step_times.mark(completed=self._inflight is not None, continuing=launched is not None,
                                         uploaded=self._cache.counters["uploads"] != uploads,
                                         prefilled=self.counters["prefill_batches"] != prefills)
                    self._inflight = launched
                    self._flush()
                    if not self._running and self._inflight is None:
                        busy = self._waiting or self._inbox or self._cache.has_pending_uploads
                        self._wake.wait(0.02 if busy else 0.5)
        except BaseException as exc:  # noqa: BLE001
            log.exception("decode loop died")
            self._failed = exc
        finally:
            self._inflight = None
            reason = ServiceUnavailable("inference engine stopped" if self._failed is None
                                        else f"inference engine failed: {self._failed}")
            for r in list(self._running.values()) + list(self._waiting) + list(self._inbox):
                self._fail(r, reason)
            self._flush()

    def _reap(self, now: float) -> None:
        for r in [r for r in self._waiting if r.cancelled or now > r.deadline]:
            self._waiting.remove(r)
            with self._lock:
                self._pending -= 1
            self._finish(r, "cancelled" if r.cancelled else "timeout")
        for r in [r for r in self._running.values() if r.cancelled or now > r.deadline]:
            self._finish(r, "cancelled" if r.cancelled else "timeout")

    def _admit(self) -> None:
        runner = self._runner
        batch: list[_Request] = []
        longest = 0
        while self._waiting and self._free:
            r = self._waiting[0]
            longest_next = max(longest, len(r.prompt_ids))
            if batch and longest_next * (len(batch) + 1) > self.prefill_tokens_per_batch:
                break
            self._waiting.popleft()
            longest = longest_next
            r.slot = heapq.heappop(self._free)
            batch.append(r)
        if not batch:
            return
        with self._lock:
            self._pending -= len(batch)
        for r in batch:
            self._running[r.slot] = r
            runner.bind_slot(r.slot, r.lease.entry.cols if r.lease else None)
            p = r.params
            runner.sampler.set_slot(r.slot, temperature=p.temperature, top_p=p.top_p, top_k=p.top_k,
                                    penalty=p.repetition_penalty, seed=r.seed, prompt_ids=r.prompt_ids)
        try:
            token_list = self._prefill(batch)
        except Exception as exc:
            if len(batch) == 1:
                log.exception("prefill failed")
                self._fail(batch[0], ServiceUnavailable(f"prefill failed: {exc}"))
                return
            # One request's failure must not end the others': find it by prefilling each alone.
            log.exception("batched prefill failed; prefilling its %d requests one by one", len(batch))
            alone, token_list = [], []
            for r in batch:
                try:
                    token_list += self._prefill([r])
                    alone.append(r)
                except Exception as exc1:
                    log.exception("prefill failed")
                    self._fail(r, ServiceUnavailable(f"prefill failed: {exc1}"))
            batch = alone
        self.counters["prefill_batches"] += 1
        self.counters["prefill_tokens"] += sum(len(r.prompt_ids) for r in batch)
        for r, t in zip(batch, token_list):
            self._emit(r, t)

    def _prefill(self, batch: list[_Request]) -> list[int]:
        """Prompt KV for the batch's slots and each request's first token."""
        runner = self._runner
        slots = [r.slot for r in batch]
        hw = max((r.lease.entry.hw for r in batch if r.lease), default=0)
        logits = runner.prefill(slots, [r.prompt_ids for r in batch], hw)
        idx = self._slots_tensor(slots)
        tokens = runner.sampler.sample(logits, idx, slots)
        runner.sampler.after_step(idx, tokens, slots)
        runner.tok_buf[idx] = tokens
        runner.pos_buf[idx] = idx.new_tensor([len(r.prompt_ids) for r in batch])
        for r in batch:
            r.n_launched = 1
        return tokens.tolist()

    def _launch(self) -> "_Step | None":
        """Enqueue one decode step for every running request that still needs a token;
        returns without waiting for the GPU."""
        runner = self._runner
        max_seq = self.max_seq_len
        rows = [(s, r) for s, r in sorted(self._running.items())
                if r.n_launched < r.params.max_tokens and len(r.prompt_ids) + r.n_launched - 1 < max_seq]
        if not rows:
            return None
        slots = [s for s, _ in rows]
        reqs = [r for _, r in rows]
        # Rows of every running request (launched or not) lie below max(self._running).
        max_pos = max(len(r.prompt_ids) + r.n_launched - 1 for r in reqs)
        max_col = max((r.lease.entry.hw for r in self._running.values() if r.lease), default=0)
        nb, kv_len, hw = runner.decode_buckets(max(self._running), max_pos, max_col)
        n = len(slots)
        idx = self._slots_tensor(slots)
        try:
            logits = runner.decode(nb, kv_len, hw)
            # Rows 0..n-1 (the common case: requests take the lowest free slots): no gather.
            rows_logits = logits[:n] if slots[-1] == n - 1 else logits[idx]
            tokens = runner.sampler.sample(rows_logits, idx, slots)
        except Exception as exc:
            log.exception("decode step of %d request(s) failed", n)
            rows, tokens = self._decode_in_parts(rows, exc)
            if not rows:
                return None
            slots = [s for s, _ in rows]
            reqs = [r for _, r in rows]
            n = len(slots)
            idx = self._slots_tensor(slots)
        try:
            runner.sampler.after_step(idx, tokens, slots)
            runner.advance(idx, tokens)
            host = runner.host_tokens[self._step_no % 2][:n]
            event = None
            if tokens.is_cuda:
                host.copy_(tokens, non_blocking=True)
                event = runner.host_events[self._step_no % 2]
                event.record()
            else:
                host = tokens
        except Exception as exc:
            log.exception("decode step failed")
            for r in list(self._running.values()):
                self._fail(r, ServiceUnavailable(f"decode failed: {exc}"))
            return None
        self._step_no += 1
        for r in reqs:
            r.n_launched += 1
        self.counters["decode_steps"] += 1
        self.counters["decode_rows"] += len(reqs)
        return _Step(list(zip(slots, reqs)), host, event)

    def _decode_in_parts(self, rows: list, exc: Exception) -> tuple[list, Any]:
        """A failed decode step again, for halves of its rows (then quarters, ...): a row
        that fails alone fails its request, every other row gets the token it would have had
        in the whole step (same inputs; the retried forward rewrites the same KV positions,
        and nothing of the sampler or the step buffers had moved). Returns the surviving
        (slot, request) rows in slot order and their sampled ids."""
        if len(rows) == 1:
            self._fail(rows[0][1], ServiceUnavailable(f"decode failed: {exc}"))
            return [], None
        runner = self._runner
        self.counters["decode_steps_split"] += 1
        done: dict[int, Any] = {}  # slot -> sampled id (0-d device tensor)
        parts = [rows[len(rows) // 2:], rows[: len(rows) // 2]]
        while parts:
            part = parts.pop()
            slots = [s for s, _ in part]
            try:
                idx = self._slots_tensor(slots)
                hw = max((r.lease.entry.hw for _, r in part if r.lease), default=0)
                tokens = runner.sampler.sample(runner.decode_slots(idx, hw), idx, slots)
            except Exception as part_exc:
                if len(part) > 1:
                    parts += [part[len(part) // 2:], part[: len(part) // 2]]
                    continue
                log.warning("decode failed for request %s alone: %s", part[0][1].id, part_exc)
                self._fail(part[0][1], ServiceUnavailable(f"decode failed: {part_exc}"))
                continue
            done.update(zip(slots, tokens))
        kept = [(s, r) for s, r in rows if s in done]
        if not kept:
            return [], None
        import torch
        return kept, torch.stack([done[s] for s, _ in kept])

    def _complete(self, step: "_Step") -> None:
        """Read a launched step's ids (waiting for the GPU if needed) and deliver them."""
        try:
            if step.event is not None:
                step.event.synchronize()  # without the GIL
            token_list = step.host.tolist()
        except Exception as exc:
            log.exception("decode step failed")
            for _, r in step.rows:
                self._fail(r, ServiceUnavailable(f"decode failed: {exc}"))
            return
        for (slot, r), t in zip(step.rows, token_list):
            if r.finished or r.slot != slot:  # ended (or cancelled) after this step was launched
                continue
            self._emit(r, t)

    def _slots_tensor(self, slots: list[int]):
        key = tuple(slots)
        t = self._slot_tensors.get(key)
        if t is None:
            import torch
            if len(self._slot_tensors) > 256:
                self._slot_tensors.clear()
            t = torch.tensor(slots, dtype=torch.int64, device=self._runner.device)
            self._slot_tensors[key] = t
        return t

    def _emit(self, r: _Request, token: int) -> None:
        r.n_generated += 1
        self.counters["tokens"] += 1
        if token in self._stop_ids:
            self._finish(r, "stop", n_stop=1)
            return
        self._post(r, (TOKEN, token))
        written_at = len(r.prompt_ids) + r.n_generated - 1  # where this token's KV would go
        if r.n_generated >= r.params.max_tokens or written_at >= self.max_seq_len:
            self._finish(r, "length")

    def _release(self, r: _Request) -> None:
        if r.slot is not None:
            self._running.pop(r.slot, None)
            self._runner.clear_slot(r.slot)
            heapq.heappush(self._free, r.slot)
            r.slot = None
        if r.lease is not None:
            r.lease.release()

    def _finish(self, r: _Request, reason: str, n_stop: int = 0) -> None:
        if r.finished:
            return
        self._release(r)
        r.finished = True
        self.counters[f"finish_{reason}"] += 1
        elapsed = time.monotonic() - r.created
        self._avg_request_s = 0.9 * self._avg_request_s + 0.1 * elapsed
        self._post(r, (END, reason, n_stop))

    def _fail(self, r: _Request, exc: BaseException) -> None:
        if r.finished:
            return
        if r.slot is None and r in self._waiting:
            self._waiting.remove(r)
            with self._lock:
                self._pending -= 1
        self._release(r)
        r.finished = True
        self.counters["failed"] += 1
        self._post(r, (ERROR, exc))

    def _post(self, r: _Request, event: tuple) -> None:
        self._outbox.setdefault(r.loop, []).append((r, event))

    def _flush(self) -> None:
        outbox, self._outbox = self._outbox, {}
        for loop, items in outbox.items():
            try:
                loop.call_soon_threadsafe(_deliver, items)
            except RuntimeError:  # the caller's loop is gone: nobody listens any more
                for r, _ in items:
                    r.cancelled = True

    # ----------------------------------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        runner = self._runner
        out: dict[str, Any] = {
            "ready": self.ready(),
            "base_model": self.base_model_name,
            "device": self.device,
            "slots": self.settings.max_batch_size,
            "max_seq_len": self.max_seq_len,
            "running": len(self._running),
            "queue_depth": self._pending,
            "max_queue": self.settings.max_queue,
            "counters": dict(self.counters),
        }
        if runner is not None:
            out["cuda_graphs"] = runner.use_graphs and not runner._graph_failed
            out["captured_graphs"] = runner.graph_count
            out["fused_ops"] = dict(runner.fused_ops)
            out["lora_kernels"] = bool(runner.ctx.kernels)
            out["decode_attention_kernel_layers"] = int(runner.decode_attention_kernel or 0)
            out["memory"] = runner.memory()
        if self._cache is not None:
            out["adapters"] = self._cache.stats()
        out["step_ms"] = self.step_times.summary()
        return out


class StepTimes:
    """Wall time between consecutive decode-step completions while decoding continues (the
    loop keeps one step in flight, so this is a step's time as the GPU runs it plus whatever
    the loop did between steps), kept apart by what else that iteration did: nothing, an
    adapter upload into the GPU pool, or a prefill. Shows whether uploads stall decoding.
    Work enqueued in one iteration runs on the GPU before the step launched after it, so it
    lands in this interval or the next: both are labelled with it."""

    def __init__(self, keep: int = 4096):
        self._times: dict[str, collections.deque] = {
            kind: collections.deque(maxlen=keep) for kind in ("plain", "upload", "prefill")}
        self._last: float | None = None
        self._before = (False, False)  # (uploaded, prefilled) in the previous iteration

    def mark(self, *, completed: bool, continuing: bool, uploaded: bool, prefilled: bool) -> None:
        now = time.perf_counter()
        if completed and self._last is not None:
            kind = ("prefill" if prefilled or self._before[1] else
                    "upload" if uploaded or self._before[0] else "plain")
            self._times[kind].append(now - self._last)
        self._last = now if completed and continuing else None
        self._before = (uploaded, prefilled)

    def reset(self) -> None:
        for times in self._times.values():
            times.clear()

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for kind, times in self._times.items():
            ordered = sorted(times)
            if ordered:
                out[kind] = {"n": len(ordered), "p50": round(ordered[len(ordered) // 2] * 1e3, 3),
                             "p99": round(ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))] * 1e3, 3),
                             "max": round(ordered[-1] * 1e3, 3)}
        return out


@dataclass(eq=False)
class _Step:
    rows: list  # (slot, _Request) in the order of `host`
    host: Any   # sampled ids [n] (pinned CPU tensor, valid once `event` completed)
    event: Any  # torch.cuda.Event recorded after the copy; None on CPU


def _deliver(items) -> None:
    for r, event in items:
        r.queue.put_nowait(event)

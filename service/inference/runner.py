"""The model runner: every GPU operation of the engine, called only from the decode thread.

It owns the base model (with LoRA wrappers installed), the slot KV cache, the LoRA column
pool, the per-slot sampling state and the static input buffers of the decode step.

Decode step shapes are static per (rows, kv_len, lora_columns) bucket: rows = slots
0..nb-1 (requests take the lowest free slot, so nb stays small when load is low),
kv_len and the LoRA high-water mark are rounded up to buckets. On CUDA each bucket's
step is captured once into a CUDA graph and replayed (no per-layer Python or kernel
launch overhead); optionally the step is torch.compile'd first. CPU stays eager.

Graphs and their memory pool live as long as the runner: one pool handle, made once, is
shared by every capture, and no graph is ever destroyed while serving. (Destroying every
graph of a shared pool drops its use count to zero; capturing into that handle again trips
`it->second->use_count > 0` in the caching allocator: what an adapter upload clearing the
graphs used to do.) Everything a graph reads is allocated before the first capture and only
written in place afterwards: token/position buffers, slot masks, LoRA pools (fixed size from
the byte budget), KV slots. The set of modules carrying a LoRA term is part of a graph's key
instead of a reason to drop graphs.
"""
from __future__ import annotations

import inspect
import logging
import math
from collections.abc import Sequence

import torch

from service.inference.kvcache import SlotKVCache
from service.inference.lora import (ColumnAllocator, LoRAContext, MultiLoRALinear, ParsedAdapter, find_target_modules,
                                    install)
from service.inference.sampling import SamplingState

log = logging.getLogger(__name__)


SLOT_ATTENTION = "tuneserve_slots"


def slot_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Attention for the decode step (one query per row) without expanding grouped KV heads.

    transformers' sdpa path repeats the KV heads to the query heads whenever a mask is given
    (GQA inside SDPA needs mask=None), i.e. copies [rows, heads, kv_len, head_dim] of K and V
    in every layer of every step: for ChatGLM3's 2 KV heads / 32 query heads that is 16x the
    cache bytes, the largest non-matmul cost of a 32-row step. Here each KV head's query
    group attends in one batched matmul. Prefill (several queries) uses SDPA unchanged."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    rows, heads, q_len, dim = query.shape
    kv_heads = key.shape[1]
    if q_len != 1 or heads % kv_heads or dropout:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, **kwargs)
    scale = scaling if scaling is not None else dim ** -0.5
    if (getattr(module, "_tuneserve_decode_kernel", False)  # one Triton kernel (kernels/attention.py)
            and query.stride(-1) == 1 and key.stride(-1) == 1 and value.stride(-1) == 1):
        from service.inference.kernels.attention import decode_attention

        return decode_attention(query, key, value, attention_mask, scale), None
    q = query.reshape(rows, kv_heads, heads // kv_heads, dim)
    scores = torch.matmul(q, key.transpose(-1, -2)).float() * scale  # [rows, kv_heads, group, kv_len]
    if attention_mask is not None:  # [rows, 1, 1, kv_len]
        scores = scores + attention_mask.float()
    probs = torch.softmax(scores, dim=-1).to(value.dtype)
    out = torch.matmul(probs, value)  # [rows, kv_heads, group, dim]
    return out.reshape(rows, 1, heads, dim), None


def _use_slot_attention(model: torch.nn.Module) -> bool:
    try:
        from transformers import AttentionInterface
        AttentionInterface.register(SLOT_ATTENTION, slot_attention)  # a new name: no other model uses it
        model.config._attn_implementation = SLOT_ATTENTION
        return True
    except Exception:  # noqa: BLE001 - an older transformers: keep its attention
        log.warning("custom decode attention unavailable; using the model's own", exc_info=True)
        return False


def _pow2_at_least(n: int, lo: int, hi: int) -> int:
    return min(hi, max(lo, 1 << max(0, math.ceil(math.log2(max(n, 1))))))


class ModelRunner:
    def __init__(self, model: torch.nn.Module, *, num_slots: int, max_seq_len: int,
                 lora_targets: Sequence[str] | str, lora_budget_bytes: int, device: torch.device,
                 cuda_graphs: bool = False, torch_compile: bool = False, max_graphs: int = 96,
                 max_lora_columns: int = 4096, nf4_kernels: bool = False,
                 nf4_kernel_rows: tuple[int, int] = (1, 128), lora_kernels: bool = False,
                 fused_ops: bool = False, decode_attention_kernel: bool = False):
        self.model = model.eval()
        self.slot_attention = _use_slot_attention(model)
        self.device = torch.device(device)
        self.inner = model.base_model  # the decoder stack (GlmModel for GlmForCausalLM)
        self.head = model.get_output_embeddings()
        emb = model.get_input_embeddings()
        self.dtype = emb.weight.dtype if emb.weight.is_floating_point() else torch.float32
        cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        self.num_slots = num_slots
        self.max_seq_len = max_seq_len
        self.vocab = int(self.head.out_features)
        n_layers = cfg.num_hidden_layers
        n_kv = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads

        # LoRA column pool sized by the byte budget (rank-aware: one column = one rank unit).
        targets = find_target_modules(model, lora_targets)
        elem = torch.empty((), dtype=self.dtype).element_size()
        self.bytes_per_column = sum((m.in_features + m.out_features) * elem for m in targets.values()) or 1
        # Capped: past a few thousand rank columns the per-slot masks grow with no use.
        self.capacity = max(0, min(max_lora_columns, int(lora_budget_bytes) // self.bytes_per_column))
        self.ctx = LoRAContext()
        self.wrapped, self.groups = install(model, lora_targets, self.capacity, self.dtype, self.device,
                                            self.ctx)
        self.shapes = {n: (w.in_features, w.out_features) for n, w in self.wrapped.items()}
        self.nf4_kernel_layers = self._use_nf4_kernels(nf4_kernel_rows) if nf4_kernels and self.device.type == "cuda" else 0
        # RMSNorm and rotary through our fused kernels (any device the kernels run on: CUDA, or
        # the interpreter in tests; the engine asks for it on CUDA only).
        self.fused_ops = self._use_fused_ops() if fused_ops else {}
        self.decode_attention_kernel = (bool(decode_attention_kernel) and self.slot_attention
                                        and self._kernels_available() and self._use_decode_attention_kernel())
        self.ctx.kernels = bool(lora_kernels) and self.device.type == "cuda" and self._kernels_available()
        if self.ctx.kernels:
            self._warm_up_lora_kernels()
        self.alloc = ColumnAllocator(self.capacity)
        self.slot_mask = torch.zeros(num_slots, max(self.capacity, 1), dtype=self.dtype, device=self.device)
        self._targeting = {n: 0 for n in self.wrapped}  # resident adapters per module
        self._enabled_ids: dict[frozenset, int] = {frozenset(): 0}
        self._enabled_id = 0  # small id of the current set of modules with a LoRA term

        self.cache = SlotKVCache(num_layers=n_layers, num_slots=num_slots, max_seq_len=max_seq_len,
                                 num_kv_heads=n_kv, head_dim=head_dim, dtype=self.dtype, device=self.device)
        self.sampler = SamplingState(num_slots, self.vocab, self.device)
        self.tok_buf = torch.zeros(num_slots, dtype=torch.int64, device=self.device)
        self.pos_buf = torch.zeros(num_slots, dtype=torch.int64, device=self.device)
        # Sampled ids go to pinned host memory without a sync; two, so step N+1 can be in
        # flight while step N's ids are read (the engine reads a step's ids one step later).
        pin = self.device.type == "cuda"
        self.host_tokens = [torch.zeros(num_slots, dtype=torch.int64, pin_memory=pin) for _ in range(2)]
        self.host_events = [torch.cuda.Event() for _ in range(2)] if pin else [None, None]
        self._kv_arange = torch.arange(max_seq_len, device=self.device)
        self._min = torch.finfo(self.dtype).min
        params = inspect.signature(self.inner.forward).parameters
        self._cache_kw = "cache" if "cache" in params else "past_key_values"

        self.use_graphs = bool(cuda_graphs) and self.device.type == "cuda"
        # Static (bucketed) decode shapes; what graphs need. Settable on CPU to test them.
        self.pad_shapes = self.use_graphs
        self._graphs: dict[tuple[int, int, int, int], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self._graph_pool = None
        self._graph_failed = False
        self.max_graphs = max_graphs
        self._decode_fn = self._decode_eager
        if torch_compile and self.device.type == "cuda":
            # Graphs are captured around the compiled function. dynamic=None: the first bucket
            # compiles static, a second kv_len/rows bucket recompiles once with those sizes
            # symbolic (instead of one ~minute-long compile per bucket).
            self._decode_fn = torch.compile(self._decode_eager, dynamic=None)

    def _kernels_available(self) -> bool:
        try:
            from service.inference import kernels
        except ImportError:
            log.warning("triton is not installed: our kernels are off")
            return False
        return kernels.available(self.device)

    def _use_nf4_kernels(self, rows: tuple[int, int]) -> int:
        """Swap the base's NF4 layers to our kernels (after the LoRA wrappers took theirs)."""
        if not self._kernels_available():
            return 0
        from service.inference.kernels.linear import use_nf4_kernels

        swapped = use_nf4_kernels(self.model, rows)
        log.info("NF4 kernels serve %d layers (batches of %d-%d rows)", swapped, *rows)
        return swapped

    def _use_decode_attention_kernel(self) -> int:
        """Mark the attention modules whose decode step `slot_attention` serves with our kernel."""
        marked = 0
        for module in self.model.modules():
            if hasattr(module, "layer_idx") and hasattr(module, "head_dim") and hasattr(module, "o_proj"):
                module._tuneserve_decode_kernel = True
                marked += 1
        log.info("decode attention kernel serves %d attention modules", marked)
        return marked

    def _use_fused_ops(self) -> dict[str, int]:
        if not self._kernels_available():
            return {}
        from service.inference.kernels.decoder import use_fused_ops

        counts = use_fused_ops(self.model)
        log.info("fused kernels serve %d RMSNorm and %d attention (rotary) modules",
                 counts["rms_norm"], counts["attention"])
        return counts

    def _warm_up_lora_kernels(self) -> None:
        """Compile the LoRA kernels' variants now (every wrapped module alone, and each attention's
        wrapped q/k/v together, as `project_shared_input` serves them), not at a first request."""
        from service.inference.kernels.lora_kernels import warm_up

        served = [([m.lora_A], [m.lora_B]) for m in self.wrapped.values()]
        for module in self.model.modules():
            qkv = [getattr(module, a, None) for a in ("q_proj", "k_proj", "v_proj")]
            qkv = [m for m in qkv if isinstance(m, MultiLoRALinear)]
            if len(qkv) > 1:
                served.append(([m.lora_A for m in qkv], [m.lora_B for m in qkv]))
        log.info("LoRA kernels compiled: %d launches", warm_up(served, self.dtype))

    # ----------------------------------------------------------------------------------
    # adapters (columns of the LoRA pool)
    # ----------------------------------------------------------------------------------
    def upload_adapter(self, parsed: ParsedAdapter) -> list[int] | None:
        """Copy an adapter into free pool columns; None when not enough columns are free.

        One host-to-device copy of the parsed buffer, then per shape group one index_copy_
        into A and one into B. The parsed layout is zero-padded for modules (and ranks) the
        adapter lacks, so reused columns never keep an evicted adapter's weights."""
        cols = self.alloc.allocate(parsed.rank)
        if cols is None:
            return None
        idx = torch.tensor(cols, dtype=torch.int64).to(self.device, non_blocking=True)
        sources = parsed.group_sources(self.device)
        for g in self.groups:
            a, b, scales = sources[g.key]
            g.A.index_copy_(1, idx, a.to(self.dtype))
            g.B.index_copy_(2, idx, (b.float() * scales[:, None, None]).to(self.dtype))
        changed = False
        for name in parsed.modules:
            self._targeting[name] += 1
            changed |= self._targeting[name] == 1
        if changed:
            self._refresh_enabled()
        return cols

    def release_adapter(self, cols: list[int], targeted: set[str]) -> None:
        self.alloc.release(cols)
        changed = False
        for name in targeted:
            self._targeting[name] -= 1
            changed |= self._targeting[name] == 0
        if changed:
            self._refresh_enabled()

    def _refresh_enabled(self) -> None:
        enabled = frozenset(n for n, c in self._targeting.items() if c > 0)
        for name, w in self.wrapped.items():
            w.enabled = name in enabled
        # Graphs bake in which modules have a LoRA term: the set is part of their key (kept,
        # never cleared: see the module docstring).
        self._enabled_id = self._enabled_ids.setdefault(enabled, len(self._enabled_ids))

    # ----------------------------------------------------------------------------------
    # slots
    # ----------------------------------------------------------------------------------
    def bind_slot(self, slot: int, cols: list[int] | None) -> None:
        self.slot_mask[slot].zero_()
        if cols:
            self.slot_mask[slot, torch.tensor(cols, dtype=torch.int64, device=self.device)] = 1

    def clear_slot(self, slot: int) -> None:
        self.slot_mask[slot].zero_()
        self.sampler.clear_slot(slot)
        self.tok_buf[slot] = 0
        self.pos_buf[slot] = 0

    def advance(self, idx: torch.Tensor, tokens: torch.Tensor) -> None:
        """Feed sampled tokens back as the next step's input (on the device, no sync)."""
        self.tok_buf[idx] = tokens
        self.pos_buf[idx] += 1
        # A row may be stepped once more before the host sees that it ended (the engine reads
        # ids one step late): keep its garbage write inside the cache.
        self.pos_buf.clamp_(max=self.max_seq_len - 1)

    # ----------------------------------------------------------------------------------
    # forward passes
    # ----------------------------------------------------------------------------------
    def _forward(self, input_ids, mask, position_ids) -> torch.Tensor:
        out = self.inner(input_ids=input_ids, attention_mask=mask, position_ids=position_ids,
                         use_cache=True, **{self._cache_kw: self.cache})
        return out.last_hidden_state

    def prefill(self, slots: list[int], prompts: list[list[int]], lora_hw: int) -> torch.Tensor:
        """Run new prompts (right-padded into one batch) into their slots. Returns last-token
        logits [n, V] (float32)."""
        n, T = len(prompts), max(len(p) for p in prompts)
        ids = torch.zeros(n, T, dtype=torch.int64)
        for i, p in enumerate(prompts):
            ids[i, : len(p)] = torch.tensor(p, dtype=torch.int64)
        lens = torch.tensor([len(p) for p in prompts], device=self.device)
        ids = ids.to(self.device)
        slots_t = torch.tensor(slots, dtype=torch.int64, device=self.device)
        positions = torch.arange(T, device=self.device)[None, :].expand(n, T)
        j = torch.arange(T, device=self.device)
        allowed = (j[None, :] <= j[:, None])[None] & (j[None, None, :] < lens[:, None, None])  # [n, T, T]
        mask = torch.zeros(n, 1, T, T, dtype=self.dtype, device=self.device)
        mask.masked_fill_(~allowed[:, None], self._min)
        self.cache.plan_prefill(slots_t, positions)
        self.ctx.mask = self.slot_mask[slots_t][:, None, :lora_hw] if lora_hw else None
        self.ctx.hw = lora_hw
        try:
            hidden = self._forward(ids, mask, positions)
        finally:
            self.ctx.mask = None
        last = hidden[torch.arange(n, device=self.device), lens - 1]
        return self.head(last).float()

    def _decode_eager(self, nb: int, kv_len: int, hw: int) -> torch.Tensor:
        pos = self.pos_buf[:nb]
        self.cache.plan_decode(pos, kv_len)
        allowed = self._kv_arange[:kv_len][None, :] <= pos[:, None]
        mask = torch.zeros(nb, 1, 1, kv_len, dtype=self.dtype, device=self.device)
        mask.masked_fill_(~allowed[:, None, None, :], self._min)
        self.ctx.mask = self.slot_mask[:nb, None, :hw] if hw else None
        self.ctx.hw = hw
        try:
            hidden = self._forward(self.tok_buf[:nb, None], mask, pos[:, None])
        finally:
            self.ctx.mask = None
        return self.head(hidden[:, 0]).float()

    def decode_slots(self, slots: torch.Tensor, hw: int) -> torch.Tensor:
        """One token for the given slots only (eager, exact shapes): logits [n, V] float32.
        The engine's fallback when a whole-batch step failed; a slot's row computes the same
        values as in the batched step, whose writes (KV at each row's position) it repeats."""
        pos = self.pos_buf[slots]
        kv_len = int(pos.max()) + 1
        self.cache.plan_decode(pos, kv_len, slots)
        allowed = self._kv_arange[:kv_len][None, :] <= pos[:, None]
        mask = torch.zeros(len(slots), 1, 1, kv_len, dtype=self.dtype, device=self.device)
        mask.masked_fill_(~allowed[:, None, None, :], self._min)
        self.ctx.mask = self.slot_mask[slots, None, :hw] if hw else None
        self.ctx.hw = hw
        try:
            hidden = self._forward(self.tok_buf[slots, None], mask, pos[:, None])
        finally:
            self.ctx.mask = None
            self.cache.decode_slots = None
        return self.head(hidden[:, 0]).float()

    def decode_buckets(self, max_slot: int, max_pos: int, max_col: int) -> tuple[int, int, int]:
        """(nb, kv_len, hw) for rows 0..max_slot, positions <= max_pos, columns < max_col."""
        if self.pad_shapes or self.use_graphs:
            nb = _pow2_at_least(max_slot + 1, 1, self.num_slots)
            kv_len = _pow2_at_least(max_pos + 1, 64, self.max_seq_len)
            hw = _pow2_at_least(max_col, 8, self.capacity) if max_col else 0
        else:
            nb, kv_len, hw = max_slot + 1, max_pos + 1, max_col
        return nb, kv_len, hw

    def decode(self, nb: int, kv_len: int, hw: int) -> torch.Tensor:
        """One token for slots 0..nb-1 from tok_buf/pos_buf. Returns logits [nb, V] float32
        (a static graph output on CUDA: consume before the next call)."""
        if not self.use_graphs or self._graph_failed:
            return self._decode_fn(nb, kv_len, hw)
        key = (nb, kv_len, hw, self._enabled_id if hw else 0)
        entry = self._graphs.get(key)
        if entry is None:
            if len(self._graphs) >= self.max_graphs:
                return self._decode_fn(nb, kv_len, hw)
            try:
                entry = self._capture(key)
            except Exception:  # never let a capture (or compile) problem take serving down
                log.exception("CUDA graph capture failed for %s; decoding eagerly from now on", key)
                self._graph_failed = True
                self._decode_fn = self._decode_eager
                torch.cuda.synchronize(self.device)
                return self._decode_fn(nb, kv_len, hw)
            self._graphs[key] = entry
        graph, out = entry
        graph.replay()
        return out

    def _capture(self, key: tuple[int, int, int, int]):
        nb, kv_len, hw, _ = key
        # The warm-up writes garbage into rows' KV at their current positions; rows of
        # running requests get it rewritten by the real step (same positions), free rows
        # do not matter.
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            for _ in range(2):
                self._decode_fn(nb, kv_len, hw)
        torch.cuda.current_stream(self.device).wait_stream(stream)
        torch.cuda.synchronize(self.device)
        if self._graph_pool is None:
            self._graph_pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        # thread_local: the loader threads may touch CUDA (pinned memory) meanwhile.
        with torch.cuda.graph(graph, pool=self._graph_pool, capture_error_mode="thread_local"):
            out = self._decode_fn(nb, kv_len, hw)
        log.info("captured decode graph rows=%d kv_len=%d lora_cols=%d lora_set=%d", *key)
        return graph, out

    @property
    def graph_count(self) -> int:
        return len(self._graphs)

    def memory(self) -> dict:
        out = {"kv_cache_bytes": self.cache.nbytes,
               "lora_pool_bytes": self.capacity * self.bytes_per_column,
               "lora_pool_columns": self.capacity,
               "lora_pool_free_columns": self.alloc.free}
        if self.device.type == "cuda":
            out["gpu_allocated_bytes"] = torch.cuda.memory_allocated(self.device)
            out["gpu_reserved_bytes"] = torch.cuda.memory_reserved(self.device)
            out["gpu_max_allocated_bytes"] = torch.cuda.max_memory_allocated(self.device)
        return out

"""The memory plan: micro-batch size (tokens), gradient accumulation and gradient
checkpointing, chosen before training from the memory budget, the model's shape and the
data's lengths, so that the job keeps its effective batch (spec.batch_size rows per
optimizer step) and either fits or fails fast with `invalid_plan`.

The memory model (bytes; `c` = compute bytes per element: 2 for bf16 on CUDA, 4 for fp32 on CPU)

  fixed    = NF4 weights      quantized_params * (0.5 + 1/64 + 4/(64*256))   (4-bit codes,
                              8-bit absmax per 64-block, fp32 absmax per 256 blocks: double quant)
           + frozen dense     dense_params * c        (embeddings, lm_head, norms, biases; kept in
                              the compute dtype, see model.py)
           + LoRA training    lora_params * 16        (fp32 weight + grad + AdamW m and v)
           + runtime reserve  RESERVE_BYTES           (CUDA/cuBLAS workspaces, allocator slack)
  per token, per decoder layer, what autograd keeps for backward:
      A = NORM_COEF*c*h (two RMSNorms: fp32 internals + input)
        + c*(4q + 2kv) (sdpa keeps q, k and v repeated to all heads, and its output; rotary
          keeps only cos/sin)
        + (1 + c) * sum(in_features of LoRA-targeted modules)  (dropout mask + lora_A input)
        + c*3f (SwiGLU: the gate|up output, the product)
      Calibrated on one ChatGLM3-6B-wide layer (h 4096, f 13696, NF4, LoRA r=8 on q/k/v,
      bf16 autocast) with torch.autograd.graph.saved_tensors_hooks: 157 KB/token saved where
      the formula gives 193 KB (it also counts the first norm and the dropout masks, which
      that measurement did not see).
  activations(T tokens) = T * (L*A + A*BWD_TRANSIENT)               without checkpointing
                        = T * (L*c*h + A*(1 + BWD_TRANSIENT))      with checkpointing
                          (layer inputs kept, one layer recomputed at a time)
  + T * EXTRA_PER_TOKEN_H * h * c (embeddings, final norm, hidden states at label positions)
  + logits: the loss is computed in chunks of CE_CHUNK label tokens:
      CE_CHUNK * V * (c + 4 + 4 + c) (logits, fp32 upcast, fp32 grad, grad in compute dtype)
  + packed attention mask (sdpa, boolean + additive copy): T^2 * (1 + c)

Plan = largest micro-batch T (capped by the largest step's tokens and MAX_MICRO_TOKENS) for
which fixed + activations(T) <= budget * (1 - SLACK). Checkpointing is chosen, when allowed,
by an explicit cost model (constants below, measured): a micro-step costs max(host time,
device time); the host time is large and nearly independent of the micro-batch size, so one
large micro-step with checkpointing beats several small ones without it on small cards.
Memory the chosen micro-batch leaves unused holds decoder layers dequantized to the compute
dtype (`dense_layers`), which removes the NF4 path's per-pass cost at identical numbers. The constants are coarse and stated; bench/training.py
prints predicted vs measured peak so they can be checked on a real card.
"""
from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

from service.core.domain import TrainingSpec
from service.core.errors import TrainingError

GiB = 2**30
NF4_BYTES_PER_PARAM = 0.5 + 1 / 64 + 4 / (64 * 256)
LORA_BYTES_PER_PARAM = 16
RESERVE_BYTES = int(0.75 * GiB)
SLACK = 0.10               # fraction of the budget never planned (allocator fragmentation)
NORM_COEF = 5              # two RMSNorms, per hidden element, in units of c (see docstring)
BWD_TRANSIENT = 0.5        # extra of one layer's activations alive during its backward
EXTRA_PER_TOKEN_H = 8
CE_CHUNK = 512
MAX_MICRO_TOKENS = 16384   # one packed row: attention cost grows with T^2
CPU_BUDGET_DEFAULT = 64 * GiB
# Cost model, calibrated with `bench/training.py --profile` on an H200 (2026-11-28, 6B GLM, NF4,
# LoRA r4 q/k/v, ~3,140-token steps): the host (Python: transformers + peft + bnb dispatch,
# ~4,000 kernel launches) enqueues a micro-step in ~0.20 s whatever its size, the device needs
# ~0.11 s for 3,140 tokens, so a micro-step costs max(host, device) and fewer, larger micro-steps
# win; checkpointing adds ~50% (one more forward); each NF4 layer adds ~0.7 ms per pass
# (dequantize + the 4-bit path's dispatch) compared with a dequantized (dense) layer.
MICRO_HOST_S = 0.20
NF4_LAYER_PASS_S = 0.7e-3
FLOPS = 700e12                    # measured bf16 matmul throughput in the training step


@dataclass(frozen=True)
class ModelShape:
    hidden: int
    layers: int
    intermediate: int
    vocab: int
    q_dim: int         # n_heads * head_dim
    kv_dim: int        # n_kv_heads * head_dim (one of k, v)
    quantized_params: int
    dense_params: int
    lora_params: int
    lora_in_per_layer: int  # sum of in_features of LoRA-targeted Linear modules, per layer

    @property
    def total_params(self) -> int:
        return self.quantized_params + self.dense_params


def _match_target(name: str, targets: Sequence[str]) -> bool:
    return any(name == t or name.endswith("." + t) for t in targets)


def model_shape(config, target_modules: Sequence[str], lora_r: int, quantize: bool = True) -> ModelShape:
    """Shape of a transformers causal LM from its config (instantiated on the meta device:
    no memory, exact parameter counts for any architecture transformers knows)."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    out_emb = model.get_output_embeddings()
    quantized = dense = lora = lora_in = 0
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear):
            is_head = mod is out_emb
            w = mod.weight.numel()
            b = mod.bias.numel() if mod.bias is not None else 0
            if quantize and not is_head:
                quantized += w
                dense += b
            else:
                dense += w + b
            if _match_target(name, target_modules) and not is_head:
                lora += lora_r * (mod.in_features + mod.out_features)
                lora_in += mod.in_features
        elif not list(mod.children()):
            dense += sum(p.numel() for p in mod.parameters(recurse=False))
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    h = text.hidden_size
    L = text.num_hidden_layers
    heads = text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or h // heads
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    return ModelShape(hidden=h, layers=L, intermediate=getattr(text, "intermediate_size", 4 * h),
                      vocab=text.vocab_size, q_dim=heads * head_dim, kv_dim=kv_heads * head_dim,
                      quantized_params=quantized, dense_params=dense, lora_params=lora,
                      lora_in_per_layer=lora_in // max(L, 1))


@dataclass(frozen=True)
class MemoryModel:
    compute_bytes: int = 2  # 2 = bf16 (CUDA), 4 = fp32 (CPU)
    quantized: bool = True

    def fixed_bytes(self, s: ModelShape) -> int:
        c = self.compute_bytes
        w = s.quantized_params * (NF4_BYTES_PER_PARAM if self.quantized else c)
        return int(w + s.dense_params * c + s.lora_params * LORA_BYTES_PER_PARAM + RESERVE_BYTES)

    def layer_bytes_per_token(self, s: ModelShape) -> float:
        c = self.compute_bytes
        return (NORM_COEF * c * s.hidden + c * (4 * s.q_dim + 2 * s.kv_dim)
                + (1 + c) * s.lora_in_per_layer + c * 3 * s.intermediate)

    def per_token_bytes(self, s: ModelShape, checkpointing: bool) -> float:
        c = self.compute_bytes
        a = self.layer_bytes_per_token(s)
        if checkpointing:
            acts = s.layers * c * s.hidden + a * (1 + BWD_TRANSIENT)
        else:
            acts = s.layers * a + a * BWD_TRANSIENT
        return acts + EXTRA_PER_TOKEN_H * s.hidden * c

    def ce_bytes(self, s: ModelShape) -> int:
        c = self.compute_bytes
        return int(CE_CHUNK * s.vocab * (c + 4 + 4 + c))

    def mask_bytes(self, tokens: int) -> int:
        return int(tokens * tokens * (1 + self.compute_bytes))

    def peak_bytes(self, s: ModelShape, tokens: int, checkpointing: bool, packed: bool = True) -> int:
        return int(self.fixed_bytes(s) + tokens * self.per_token_bytes(s, checkpointing)
                   + self.ce_bytes(s) + (self.mask_bytes(tokens) if packed else 0))

    def max_tokens(self, s: ModelShape, budget: int, checkpointing: bool, packed: bool = True) -> int:
        """Largest T with peak_bytes(T) <= budget*(1-SLACK) (solves the quadratic mask term)."""
        room = budget * (1 - SLACK) - self.fixed_bytes(s) - self.ce_bytes(s)
        if room <= 0:
            return 0
        a = self.mask_bytes(1) if packed else 0
        b = self.per_token_bytes(s, checkpointing)
        t = room / b if a == 0 else (-b + math.sqrt(b * b + 4 * a * room)) / (2 * a)
        return max(0, int(t))


@dataclass
class MemoryPlan:
    packing: bool
    gradient_checkpointing: bool
    micro_batch_tokens: int          # token budget of one micro-step (packed row length cap)
    micro_batch_rows: int            # rows per micro-step in padded mode
    gradient_accumulation_steps: int  # expected micro-steps per optimizer step (varies with lengths)
    effective_batch_size: int         # rows per optimizer step (all ranks)
    world_size: int
    budget_bytes: int
    fixed_bytes: int
    per_token_bytes: int
    predicted_peak_bytes: int
    max_example_tokens: int
    mean_example_tokens: float
    predicted_tokens_per_s: float | None = None
    dense_layers: int = 0            # decoder layers held dequantized (model.dequantize_layers)
    attention: str = "sdpa"          # "varlen": flash varlen kernel on packed rows (CUDA)
    reason: str = ""
    candidates: list[dict] = field(default_factory=list)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["budget_gib"] = round(self.budget_bytes / GiB, 2)
        d["predicted_peak_gib"] = round(self.predicted_peak_bytes / GiB, 2)
        return d

    def summary(self) -> str:
        return (f"memory plan: {'packed' if self.packing else 'padded'} micro-batches of "
                f"<= {self.micro_batch_tokens} tokens"
                + ("" if self.packing else f" ({self.micro_batch_rows} rows)")
                + f", ~{self.gradient_accumulation_steps} micro-steps per step of "
                f"{self.effective_batch_size} rows, gradient checkpointing "
                f"{'on' if self.gradient_checkpointing else 'off'}, {self.dense_layers} layers "
                f"dequantized, {self.attention} attention; predicted peak "
                f"{self.predicted_peak_bytes / GiB:.1f} of {self.budget_bytes / GiB:.1f} GiB")


def device_budget(device: str) -> int:
    """Bytes the run may use: free CUDA memory, or (CPU) a large share of physical memory."""
    if device.startswith("cuda"):
        import torch

        free, _total = torch.cuda.mem_get_info(torch.device(device))
        return int(free)
    try:
        phys = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        return int(max(phys * 0.8, 1 * GiB))
    except (ValueError, OSError):
        return CPU_BUDGET_DEFAULT


def _step_time(s: ModelShape, step_tokens: float, micro_tokens: int, checkpointing: bool,
               nf4_layers: int = 0) -> float:
    """Seconds per optimizer step: each micro-step costs max(host, device) time (see the
    constants: measured, the host side dominates at these sizes)."""
    n_micro = max(1, math.ceil(step_tokens / max(micro_tokens, 1)))
    passes = 3 if checkpointing else 2
    tokens = step_tokens / n_micro
    host = MICRO_HOST_S * (1.5 if checkpointing else 1.0) + NF4_LAYER_PASS_S * passes * nf4_layers
    device = tokens * passes * 2 * s.total_params / FLOPS
    return n_micro * max(host, device)


def dense_layer_bytes(s: ModelShape, memory: "MemoryModel") -> int:
    """Extra bytes of one decoder layer held dequantized (compute dtype) instead of NF4."""
    if not memory.quantized:
        return 0
    return int(s.quantized_params / max(s.layers, 1) * (memory.compute_bytes - NF4_BYTES_PER_PARAM))


def choose_plan(shape: ModelShape, lengths: Sequence[int], spec: TrainingSpec, budget_bytes: int, *,
                memory: MemoryModel | None = None, world_size: int = 1,
                packing_supported: bool = True, allow_dense: bool = True) -> MemoryPlan:
    """Pick the plan (see module docstring). Raises TrainingError(code="invalid_plan") when even
    one longest example cannot be trained within the budget."""
    memory = memory or MemoryModel()
    if not lengths:
        raise TrainingError("no examples to plan for", code="invalid_data")
    packing = bool(spec.packing and packing_supported)
    max_len = max(lengths)
    mean_len = sum(lengths) / len(lengths)
    rows_per_rank = math.ceil(spec.batch_size / world_size)
    worst_step = sum(sorted(lengths, reverse=True)[:rows_per_rank])
    avg_step = mean_len * min(rows_per_rank, len(lengths))

    # A user-fixed micro-batch (rows) or accumulation pins the micro-batch size.
    fixed_rows = spec.micro_batch_size
    if fixed_rows is None and spec.gradient_accumulation_steps:
        fixed_rows = max(1, math.ceil(rows_per_rank / spec.gradient_accumulation_steps))
    gc_options = [False, True] if spec.gradient_checkpointing == "auto" else [bool(spec.gradient_checkpointing)]

    candidates = []
    for gc in gc_options:
        cap = memory.max_tokens(shape, budget_bytes, gc, packed=packing)
        if fixed_rows is not None:
            tokens = fixed_rows * max_len
            feasible = tokens <= cap
        else:
            tokens = min(cap, max(worst_step, max_len), max(MAX_MICRO_TOKENS, max_len))
            feasible = tokens >= max_len
        if not packing:
            rows = max(1, min(rows_per_rank, fixed_rows or tokens // max(max_len, 1)))
            tokens = rows * max_len if feasible else tokens
        else:
            rows = max(1, min(rows_per_rank, tokens // max(max_len, 1)))
        peak = memory.peak_bytes(shape, tokens, gc, packing)
        # Spend what the micro-batch leaves on dequantized (dense) layers: faster, same numbers.
        per_layer = dense_layer_bytes(shape, memory)
        dense = 0
        if feasible and per_layer and allow_dense:
            room = budget_bytes * (1 - SLACK) - peak
            dense = max(0, min(shape.layers, int(room // per_layer)))
        peak += dense * per_layer
        nf4 = (shape.layers - dense) if memory.quantized else 0
        t = _step_time(shape, avg_step, tokens, gc, nf4) if feasible else None
        candidates.append({"gradient_checkpointing": gc, "max_tokens": cap, "micro_batch_tokens": tokens,
                           "micro_batch_rows": rows, "feasible": feasible, "dense_layers": dense,
                           "predicted_peak_bytes": peak,
                           "predicted_tokens_per_s": round(avg_step / t, 1) if t else None})
    ok = [c for c in candidates if c["feasible"]]
    if not ok:
        need = memory.peak_bytes(shape, max_len if fixed_rows is None else fixed_rows * max_len,
                                 True if True in gc_options else False, packing)
        what = (f"micro_batch_size={fixed_rows} rows of {max_len} tokens" if fixed_rows is not None
                else f"one example of {max_len} tokens (the longest)")
        raise TrainingError(
            f"impossible memory plan: {what} needs about {need / GiB:.1f} GiB "
            f"(model {memory.fixed_bytes(shape) / GiB:.1f} GiB) but the budget is "
            f"{budget_bytes / GiB:.1f} GiB; lower max_source_length/max_target_length"
            + (", micro_batch_size" if fixed_rows is not None else "")
            + (", or allow gradient_checkpointing" if True not in gc_options else "")
            + ", or use a larger GPU", code="invalid_plan", param="hyperparameters")
    best = max(ok, key=lambda c: c["predicted_tokens_per_s"])
    tokens, gc = best["micro_batch_tokens"], best["gradient_checkpointing"]
    if packing:
        accum = max(1, math.ceil(avg_step / tokens))
    else:
        accum = max(1, math.ceil(rows_per_rank / best["micro_batch_rows"]))
    why = ("micro-batch fixed by the spec" if fixed_rows is not None else
           "largest micro-batch that fits; checkpointing by the cost model"
           if len(ok) > 1 else "only feasible checkpointing setting")
    return MemoryPlan(
        packing=packing, gradient_checkpointing=gc, micro_batch_tokens=tokens,
        micro_batch_rows=best["micro_batch_rows"], gradient_accumulation_steps=accum,
        effective_batch_size=spec.batch_size, world_size=world_size, budget_bytes=int(budget_bytes),
        fixed_bytes=memory.fixed_bytes(shape), per_token_bytes=int(memory.per_token_bytes(shape, gc)),
        predicted_peak_bytes=best["predicted_peak_bytes"], max_example_tokens=max_len,
        mean_example_tokens=round(mean_len, 1), predicted_tokens_per_s=best["predicted_tokens_per_s"],
        dense_layers=best["dense_layers"],
        attention="varlen" if packing and memory.compute_bytes == 2 else "sdpa",
        reason=why, candidates=candidates)

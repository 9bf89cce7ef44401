"""A decoder layer's RMSNorm and rotary embedding through our fused kernels (`fused.py`).

`use_fused_ops(model)` rebinds, per module instance, the `forward` of the RMSNorm and
attention modules of the families whose code it mirrors (GLM: interleaved partial rotary;
Llama: rotate-half); other families keep transformers' code. Nothing is copied: the modules
keep their weights, their projections (NF4 or LoRA-wrapped) are called as before, and the
KV cache and attention function are the ones the model was given.
"""
from __future__ import annotations

import types

import torch
import triton

from service.inference.kernels import fused as _fused
from service.inference.lora import project_shared_input

# Class name -> the rotary layout its transformers code applies.
INTERLEAVED_ROTARY = {"GlmAttention": True, "LlamaAttention": False}
# Attention served with the fused rotary. (Llama's rotate-half once failed its bf16 check on an
# H200: LLVM contracted the rounded products into FMAs; `rotate` now launches without that.)
FUSED_ATTENTION = set(INTERLEAVED_ROTARY)
# Llama-style RMSNorm: weight * (x * rsqrt(mean(x^2) + eps)).to(input dtype).
RMS_NORMS = {"GlmRMSNorm", "LlamaRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm", "MistralRMSNorm"}


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """What transformers' Llama-style RMSNorm returns for x [..., N]."""
    n = x.shape[-1]
    x2 = x.reshape(-1, n)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    out = torch.empty(x2.shape, dtype=torch.promote_types(weight.dtype, x.dtype), device=x.device)
    if x2.shape[0]:
        _fused._rms_norm[(x2.shape[0],)](x2, weight, out, n, x2.stride(0), out.stride(0), float(eps),
                                         BLOCK=triton.next_power_of_2(n), num_warps=4 if n <= 4096 else 8)
    return out.reshape(x.shape)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool) -> torch.Tensor:
    """transformers' rotary embedding of x [B, H, T, D] with its cos/sin [B, T, ROT] (ROT <= D,
    cat(freqs, freqs) as every transformers rotary module builds them; positions past ROT pass
    through): GLM's layout turns pairs (2i, 2i+1), Llama's (i, i + ROT/2), both by freqs[i].
    Any strides; the result keeps x's."""
    b, h, t, d = x.shape
    rot = cos.shape[-1]
    if cos.shape != sin.shape or rot > d or rot % 2 or cos.dim() != 3:
        raise ValueError(f"unsupported rotary shapes: x {tuple(x.shape)}, cos {tuple(cos.shape)}")
    cos, sin = cos.expand(b, t, rot), sin.expand(b, t, rot)
    if cos.stride(-1) != 1 or sin.stride() != cos.stride():
        cos, sin = cos.contiguous(), sin.contiguous()
    out = torch.empty_like(x)
    if x.numel():
        _fused._rotate[(b * t, h)](
            x, out, cos, sin, h, t, *x.stride()[:3], *out.stride()[:3], cos.stride(0), cos.stride(1),
            D=d, ROT=rot, INTERLEAVED=interleaved, HALF_POW2=triton.next_power_of_2(rot // 2),
            PASS_POW2=triton.next_power_of_2(max(d - rot, 1)), num_warps=1,
            enable_fp_fusion=False)  # each product rounded on its own, as PyTorch does (no FMA contraction)
    return out


def rotate_into_cache(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, cos: torch.Tensor,
                      sin: torch.Tensor, interleaved: bool, k_cache: torch.Tensor, v_cache: torch.Tensor,
                      slots: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """One decode step's rotary and KV-cache write in one launch: q [B, Hq, 1, D] rotated into a
    new tensor (returned, q's strides), k [B, Hk, 1, D] rotated into k_cache[slots[b], :,
    positions[b]] and v copied into v_cache there (caches [slots, Hk, max_len, D]). The same
    roundings as `rotate` followed by the cache's index write."""
    b, hq, t, d = query.shape
    hk = key.shape[1]
    rot = cos.shape[-1]
    if (t != 1 or key.shape[2] != 1 or cos.shape != sin.shape or rot > d or rot % 2 or cos.dim() != 3
            or min(query.stride(-1), key.stride(-1), value.stride(-1), k_cache.stride(-1), v_cache.stride(-1)) != 1):
        raise ValueError(f"unsupported decode rotary shapes: q {tuple(query.shape)}, cos {tuple(cos.shape)}")
    cos, sin = cos.expand(b, 1, rot), sin.expand(b, 1, rot)
    if cos.stride(-1) != 1 or sin.stride() != cos.stride():
        cos, sin = cos.contiguous(), sin.contiguous()
    out = torch.empty_like(query)
    _fused._rotate_into_cache[(b, hq + hk)](
        query, key, value, out, k_cache, v_cache, cos, sin, slots, positions, hq,
        query.stride(0), query.stride(1), key.stride(0), key.stride(1), value.stride(0), value.stride(1),
        out.stride(0), out.stride(1), *k_cache.stride()[:3], *v_cache.stride()[:3], cos.stride(0),
        D=d, ROT=rot, INTERLEAVED=interleaved, HALF_POW2=triton.next_power_of_2(rot // 2),
        PASS_POW2=triton.next_power_of_2(max(d - rot, 1)), D_POW2=triton.next_power_of_2(d), num_warps=1,
        enable_fp_fusion=False)
    return out


def _norm_forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
    return rms_norm(hidden_states, self.weight, self.variance_epsilon)


def _attention_forward(self, hidden_states, position_embeddings=None, attention_mask=None, cache=None,
                       past_key_values=None, **kwargs):
    """transformers' GLM / Llama attention forward (5.x), the rotary step fused (and the q/k/v
    LoRA terms grouped, when the LoRA kernels are on)."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    cache = cache if cache is not None else past_key_values
    input_shape = hidden_states.shape[:-1]
    hidden_shape = (*input_shape, -1, self.head_dim)
    query, key, value = (t.view(hidden_shape).transpose(1, 2) for t in
                         project_shared_input([self.q_proj, self.k_proj, self.v_proj], hidden_states))
    cos, sin = position_embeddings
    written = None
    if getattr(self, "_tuneserve_decode_kernel", False) and hasattr(cache, "write_decode_rotated"):
        # the engine's slot cache in a decode step: rotary and KV write in one launch
        written = cache.write_decode_rotated(self.layer_idx, query, key, value, cos, sin, self._tuneserve_interleaved)
    if written is not None:
        query, key, value = written
    else:
        query = rotate(query, cos, sin, self._tuneserve_interleaved)
        key = rotate(key, cos, sin, self._tuneserve_interleaved)
        if cache is not None:
            key, value = cache.update(key, value, self.layer_idx, kwargs=kwargs)
    attention = ALL_ATTENTION_FUNCTIONS.get(self.config._attn_implementation)
    if attention is None:  # "eager": transformers' own function, not in its registry
        from transformers.models.llama.modeling_llama import eager_attention_forward as attention
    out, weights = attention(self, query, key, value, attention_mask, dropout=0.0, scaling=self.scaling, **kwargs)
    out = out.reshape(*input_shape, -1).contiguous()
    return self.o_proj(out), weights


def use_fused_ops(model: torch.nn.Module) -> dict[str, int]:
    """Rebind the forward of the model's supported norm and attention modules; returns how
    many of each. Attention modules whose config asks for what the mirror lacks (dropout in
    training, an attention implementation other than the model's own registry) are left."""
    counts = {"rms_norm": 0, "attention": 0}
    for module in model.modules():
        name = type(module).__name__
        if name in RMS_NORMS and hasattr(module, "variance_epsilon") and module.weight.dim() == 1:
            module.forward = types.MethodType(_norm_forward, module)
            counts["rms_norm"] += 1
        elif name in FUSED_ATTENTION and all(hasattr(module, a) for a in ("q_proj", "k_proj", "v_proj", "o_proj",
                                                                               "head_dim", "scaling", "layer_idx")):
            module._tuneserve_interleaved = INTERLEAVED_ROTARY[name]
            module.forward = types.MethodType(_attention_forward, module)
            counts["attention"] += 1
    return counts

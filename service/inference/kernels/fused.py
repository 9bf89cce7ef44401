"""Fused per-token kernels of a decoder layer (Triton): RMSNorm and rotary embedding.

Why our own: transformers runs a Llama-style RMSNorm as eight kernels (cast, pow, mean, add,
rsqrt, mul, cast, weight mul) and the rotary embedding of q and k as about twenty (slices,
repeat_interleave, rotate_half's stack/cat, four multiplies, two adds, two cats): at one
row each is a 1-4 us launch on a few KB, and together they were ~1,200 of a decode step's
1,920 kernels on an H200 (`../shared/reference/DECODE_PROFILE.md`). Liger's kernels cover
the norm and Llama's rotate-half RoPE but not GLM's interleaved, partial rotary; these two
kernels cover both with one code path and no new dependency.

Both reproduce transformers' rounding, op for op: the norm's float32 value is rounded to the
input dtype before the weight multiply (then rounded to the promoted dtype), and each rotary
product and the sum are rounded to the activations' dtype, as PyTorch's elementwise ops do.
So a bf16 result differs from transformers' only where float32 reduction order or rsqrt's
last bit moves a rounding (norm), and not at all for the rotary embedding.
"""
from __future__ import annotations

import triton
import triton.language as tl

from service.inference.kernels.nf4 import _EMULATE_RTNE, _round


@triton.jit
def _rms_norm(x_ptr, w_ptr, y_ptr, N, stride_x, stride_y, eps, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < N
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    xf = x.to(tl.float32)
    variance = tl.sum(xf * xf, axis=0) / N
    normed = _round(xf * tl.rsqrt(variance + eps), x_ptr.dtype.element_ty, _EMULATE_RTNE).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + row * stride_y + cols, _round(w * normed, y_ptr.dtype.element_ty, _EMULATE_RTNE), mask=mask)


@triton.jit
def _rotate(x_ptr, y_ptr, cos_ptr, sin_ptr, H, T, sxb, sxh, sxt, syb, syh, syt, scb, sct,
            D: tl.constexpr, ROT: tl.constexpr, INTERLEAVED: tl.constexpr, HALF_POW2: tl.constexpr,
            PASS_POW2: tl.constexpr):
    """One (batch, position, head) row of q or k: [D] values, the first ROT rotated."""
    bt = tl.program_id(0)
    h = tl.program_id(1)
    b = (bt // T).to(tl.int64)
    t = (bt % T).to(tl.int64)
    _rotate_row(x_ptr + b * sxb + h.to(tl.int64) * sxh + t * sxt, y_ptr + b * syb + h.to(tl.int64) * syh + t * syt,
                cos_ptr + b * scb + t * sct, sin_ptr + b * scb + t * sct, y_ptr.dtype.element_ty,
                D, ROT, INTERLEAVED, HALF_POW2, PASS_POW2)


@triton.jit
def _rotate_row(x_row, y_row, cos_row, sin_row, dtype: tl.constexpr, D: tl.constexpr, ROT: tl.constexpr,
                INTERLEAVED: tl.constexpr, HALF_POW2: tl.constexpr, PASS_POW2: tl.constexpr):
    """y = x rotated by (cos, sin) over its first ROT values, the rest copied."""
    HALF: tl.constexpr = ROT // 2
    i = tl.arange(0, HALF_POW2)
    im = i < HALF
    if INTERLEAVED:  # GLM: pair (2i, 2i+1) turns by freqs[i] (cos[..., :ROT//2] repeated twice)
        first = 2 * i
        second = 2 * i + 1
    else:            # Llama: pair (i, i + ROT/2) turns by freqs[i] (cos = cat(freqs, freqs))
        first = i
        second = i + HALF
    c = tl.load(cos_row + i, mask=im, other=0.0).to(tl.float32)
    s = tl.load(sin_row + i, mask=im, other=0.0).to(tl.float32)
    x1 = tl.load(x_row + first, mask=im, other=0.0).to(tl.float32)
    x2 = tl.load(x_row + second, mask=im, other=0.0).to(tl.float32)
    # transformers: x * cos + rotate_half(x) * sin, each product and the sum rounded
    y1 = _round(_round(x1 * c, dtype, _EMULATE_RTNE).to(tl.float32)
                + _round(-x2 * s, dtype, _EMULATE_RTNE).to(tl.float32), dtype, _EMULATE_RTNE)
    y2 = _round(_round(x2 * c, dtype, _EMULATE_RTNE).to(tl.float32)
                + _round(x1 * s, dtype, _EMULATE_RTNE).to(tl.float32), dtype, _EMULATE_RTNE)
    tl.store(y_row + first, y1, mask=im)
    tl.store(y_row + second, y2, mask=im)
    if ROT < D:  # the part left as it is (partial rotary)
        j = ROT + tl.arange(0, PASS_POW2)
        jm = j < D
        tl.store(y_row + j, tl.load(x_row + j, mask=jm, other=0.0), mask=jm)


@triton.jit
def _rotate_into_cache(q_ptr, k_ptr, v_ptr, qo_ptr, kc_ptr, vc_ptr, cos_ptr, sin_ptr, slot_ptr, pos_ptr, HQ,
                       sqb, sqh, skb, skh, svb, svh, sob, soh, scs, sch, sct, svs, svh2, svt, scb,
                       D: tl.constexpr, ROT: tl.constexpr, INTERLEAVED: tl.constexpr, HALF_POW2: tl.constexpr,
                       PASS_POW2: tl.constexpr, D_POW2: tl.constexpr):
    """A decode step's rotary and KV-cache write in one launch: program (row, h) rotates query
    head h (h < HQ) into the query output, or rotates key head h - HQ straight into the cache
    at (the row's slot, head, the row's position) and copies the value head beside it."""
    b = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    cos_row = cos_ptr + b * scb
    sin_row = sin_ptr + b * scb
    dtype = qo_ptr.dtype.element_ty
    if h < HQ:
        hq = h.to(tl.int64)
        _rotate_row(q_ptr + b * sqb + hq * sqh, qo_ptr + b * sob + hq * soh, cos_row, sin_row, dtype,
                    D, ROT, INTERLEAVED, HALF_POW2, PASS_POW2)
    else:
        hk = (h - HQ).to(tl.int64)
        slot = tl.load(slot_ptr + b).to(tl.int64)
        pos = tl.load(pos_ptr + b).to(tl.int64)
        _rotate_row(k_ptr + b * skb + hk * skh, kc_ptr + slot * scs + hk * sch + pos * sct, cos_row, sin_row,
                    kc_ptr.dtype.element_ty, D, ROT, INTERLEAVED, HALF_POW2, PASS_POW2)
        d = tl.arange(0, D_POW2)
        dm = d < D
        v = tl.load(v_ptr + b * svb + hk * svh + d, mask=dm, other=0.0)
        tl.store(vc_ptr + slot * svs + hk * svh2 + pos * svt + d, v.to(vc_ptr.dtype.element_ty), mask=dm)

"""Decode attention over the slot KV cache in one Triton kernel (one query per row).

Why: the engine's decode attention (`runner.slot_attention`) is a score matmul, a scale, a
cast, the mask add, a softmax, a cast and the value matmul: seven launches a layer, each a few
microseconds at decode sizes. Here one program per (row, KV head) attends its whole query
group (GQA: ChatGLM3's 16 query heads per KV head) with an online softmax over KV blocks,
reading the cache views `SlotKVCache.update` returns in place (any strides).

Long caches are split across programs (flash-decoding): at one ChatGLM3 row only 2 (row, KV
head) pairs exist, so each pair's KV range is cut into `splits` pieces of at least 128
positions, each piece's (max, sum, weighted values) stored in float32 and combined by a second
small kernel.

Numerics: scores and the softmax in float32 (the PyTorch path rounds the raw scores to the
activations' dtype first), probabilities rounded to the value dtype for the tensor-core
product, normalised once at the end in float32. So the result is not bit-identical to the
PyTorch path but closer to the exact value; tests bound both against float64.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from service.inference.kernels.nf4 import _EMULATE_RTNE, INTERPRETING, _round


@triton.jit(do_not_specialize=["KV_LEN", "PER_SPLIT"])
def _decode_attention(q_ptr, k_ptr, v_ptr, mask_ptr, o_ptr, ws_ptr, ml_ptr, KV_LEN, PER_SPLIT, scale,
                      sqr, sqh, skr, skh, skt, svr, svh, svt, smr, sor, soh,
                      GROUP: tl.constexpr, GROUP_POW2: tl.constexpr, D: tl.constexpr, D_POW2: tl.constexpr,
                      BLOCK: tl.constexpr, HAS_MASK: tl.constexpr, DOT_F32: tl.constexpr, SPLIT: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    kvh = tl.program_id(1).to(tl.int64)
    piece = tl.program_id(2)
    g = tl.arange(0, GROUP_POW2)
    d = tl.arange(0, D_POW2)
    g_ok = g < GROUP
    d_ok = d < D
    heads = kvh * GROUP + g
    q = tl.load(q_ptr + row * sqr + heads[:, None] * sqh + d[None, :], mask=g_ok[:, None] & d_ok[None, :], other=0.0)
    m_i = tl.full((GROUP_POW2,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((GROUP_POW2,), dtype=tl.float32)
    acc = tl.zeros((GROUP_POW2, D_POW2), dtype=tl.float32)
    t = tl.arange(0, BLOCK)
    lo = piece * PER_SPLIT
    hi = tl.minimum(lo + PER_SPLIT, KV_LEN)
    for start in range(lo, hi, BLOCK):
        pos = start + t
        t_ok = pos < hi
        kv_ok = t_ok[:, None] & d_ok[None, :]
        k = tl.load(k_ptr + row * skr + kvh * skh + pos.to(tl.int64)[:, None] * skt + d[None, :], mask=kv_ok, other=0.0)
        v = tl.load(v_ptr + row * svr + kvh * svh + pos.to(tl.int64)[:, None] * svt + d[None, :], mask=kv_ok, other=0.0)
        if DOT_F32:
            s = tl.dot(q.to(tl.float32), tl.trans(k.to(tl.float32)), input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(k))
        s = s * scale
        if HAS_MASK:
            s += tl.load(mask_ptr + row * smr + pos, mask=t_ok, other=0.0).to(tl.float32)[None, :]
        s = tl.where(t_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        p = tl.exp(s - m_new[:, None])
        alpha = tl.exp(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        if DOT_F32:
            pv = tl.dot(p, v.to(tl.float32), input_precision="ieee")
        else:
            pv = tl.dot(p.to(v.dtype), v)
        acc = acc * alpha[:, None] + pv
        m_i = m_new
    if SPLIT:  # this piece's running max, sum and weighted values, combined by _combine_pieces
        heads_all = tl.num_programs(1) * GROUP
        at = (row * heads_all + heads) * tl.num_programs(2) + piece  # [GROUP_POW2]
        tl.store(ml_ptr + 2 * at, m_i, mask=g_ok)
        tl.store(ml_ptr + 2 * at + 1, l_i, mask=g_ok)
        tl.store(ws_ptr + at[:, None] * D + d[None, :], acc, mask=g_ok[:, None] & d_ok[None, :])
    else:
        out = acc / l_i[:, None]
        tl.store(o_ptr + row * sor + heads[:, None] * soh + d[None, :],
                 _round(out, o_ptr.dtype.element_ty, _EMULATE_RTNE), mask=g_ok[:, None] & d_ok[None, :])


@triton.jit
def _combine_pieces(ws_ptr, ml_ptr, o_ptr, HEADS, sor, soh, PIECES: tl.constexpr, PIECES_POW2: tl.constexpr,
                    D: tl.constexpr, D_POW2: tl.constexpr):
    """One (row, head): softmax-weighted sum of its pieces (a piece with no position has max -inf)."""
    row = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1).to(tl.int64)
    p = tl.arange(0, PIECES_POW2)
    d = tl.arange(0, D_POW2)
    p_ok = p < PIECES
    at = (row * HEADS + head) * PIECES + p
    m = tl.load(ml_ptr + 2 * at, mask=p_ok, other=float("-inf"))
    l_ = tl.load(ml_ptr + 2 * at + 1, mask=p_ok, other=0.0)
    m_all = tl.max(m, axis=0)
    w = tl.where(p_ok & (m > float("-inf")), tl.exp(m - m_all), 0.0)
    acc = tl.load(ws_ptr + at[:, None] * D + d[None, :], mask=p_ok[:, None] & (d < D)[None, :], other=0.0)
    out = tl.sum(acc * w[:, None], axis=0) / tl.sum(l_ * w, axis=0)
    tl.store(o_ptr + row * sor + head * soh + d, _round(out, o_ptr.dtype.element_ty, _EMULATE_RTNE), mask=d < D)


# Split a (row, KV head) pair's cache when fewer pairs than this run (two per H200 SM) ...
TARGET_PROGRAMS = 264
# ... into pieces of at least this many positions.
MIN_PIECE = 128


def pieces(rows: int, kv_heads: int, kv_len: int) -> int:
    """How many programs share one (row, KV head) pair's KV range."""
    pairs = rows * kv_heads
    return max(1, min(-(-TARGET_PROGRAMS // pairs), -(-kv_len // MIN_PIECE)))


def decode_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     attention_mask: torch.Tensor | None, scale: float, splits: int | None = None) -> torch.Tensor:
    """softmax(q K^T * scale + mask) V for one query per row: query [rows, heads, 1, D], key and
    value [rows, kv_heads, kv_len, D] (any strides, last unit), mask [rows, 1, 1, kv_len]
    additive or None. Returns [rows, 1, heads, D] (the layout transformers' attention
    functions return) in the query's dtype. `splits`: pieces per (row, KV head) (default:
    `pieces`)."""
    rows, heads, q_len, dim = query.shape
    kv_heads, kv_len = key.shape[1], key.shape[2]
    if q_len != 1 or heads % kv_heads or key.stride(-1) != 1 or value.stride(-1) != 1 or query.stride(-1) != 1:
        raise ValueError(f"unsupported decode attention shapes: q {tuple(query.shape)}, k {tuple(key.shape)}")
    group = heads // kv_heads
    out = torch.empty(rows, 1, heads, dim, dtype=query.dtype, device=query.device)
    mask = attention_mask
    if mask is not None:
        mask = mask.reshape(mask.shape[0], mask.shape[-1])
        if mask.stride(-1) != 1:
            mask = mask.contiguous()
    block = 64
    n = max(1, min(splits or pieces(rows, kv_heads, kv_len), -(-kv_len // block)))
    per = -(-kv_len // n)
    per = -(-per // block) * block  # whole blocks per piece
    n = -(-kv_len // per)
    split = n > 1
    ws = torch.empty(rows * heads * n, dim, dtype=torch.float32, device=query.device) if split else out
    ml = torch.empty(rows * heads * n * 2, dtype=torch.float32, device=query.device) if split else out
    d_pow2 = max(16, triton.next_power_of_2(dim))
    _decode_attention[(rows, kv_heads, n)](
        query, key, value, mask if mask is not None else out, out, ws, ml, kv_len, per, float(scale),
        query.stride(0), query.stride(1), *key.stride()[:3], *value.stride()[:3],
        mask.stride(0) if mask is not None else 0, out.stride(0), out.stride(2),
        GROUP=group, GROUP_POW2=max(16, triton.next_power_of_2(group)), D=dim, D_POW2=d_pow2, BLOCK=block,
        HAS_MASK=mask is not None, DOT_F32=INTERPRETING or query.dtype == torch.float32, SPLIT=split, num_warps=4)
    if split:
        _combine_pieces[(rows, heads)](ws, ml, out, heads, out.stride(0), out.stride(2), PIECES=n,
                                       PIECES_POW2=triton.next_power_of_2(n), D=dim, D_POW2=d_pow2, num_warps=1)
    return out

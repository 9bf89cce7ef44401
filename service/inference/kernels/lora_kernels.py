"""Multi-LoRA for a mixed batch in two Triton kernels (shrink, expand), graph-capturable.

The engine's column pool (service/inference/lora.py): A `[R, in]`, B `[out, R]` (B already
scaled), a per-row 0/1 mask over the first `hw` columns selecting the row's adapter. For
every row at once

    y += ((x @ A[:hw].T) * mask) @ B[:, :hw].T

PyTorch spells that as two GEMMs, a multiply, an add and casts (about six launches per
module). Here `lora_group` runs it for up to MAX_GROUP modules that read the same input (an
attention's q, k, v) in two launches: a shrink (x @ A.T, masked, float32 out; grid axis 2 =
module) and an expand (@ B.T, added into y in place with one rounding; each output-column
tile knows its module). A lone module is a group of one. Why grouped: each launch is a few
microseconds of mostly fixed cost, and a ChatGLM3 decode step with LoRA on q/k/v ran 168
GEMMs and 168 elementwise kernels for it (about 1.1 ms of a 4.6 ms one-row step on an
H200). Rank-aware: the cost follows `hw`, the highest column any running adapter uses. Rows
of x may be tokens of sequences (a prefill): `tokens_per_mask` rows share one mask row.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from service.inference.kernels.nf4 import _EMULATE_RTNE, INTERPRETING, _round


def _blocks(m: int) -> int:
    return 16 if m <= 16 else 32 if m <= 32 else 64


MAX_GROUP = 3


@triton.jit
def _select(g, v0, v1, v2):
    return tl.where(g == 0, v0, tl.where(g == 1, v1, v2))


# Row counts, the column high-water mark and the strides that follow them vary per call:
# specialised on (== 1, % 16), every new class compiled a variant in the middle of serving.
@triton.jit(do_not_specialize=["M", "HW", "TOKENS_PER_MASK", "stride_mm", "stride_og", "stride_om"])
def _lora_shrink_group(x_ptr, a0, a1, a2, mask_ptr, out_ptr, M, K, HW, TOKENS_PER_MASK,
                       stride_xm, sa0, sa1, sa2, stride_mm, stride_og, stride_om,
                       BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr, DOT_F32: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_c = tl.program_id(1)
    g = tl.program_id(2)
    a_ptr = _select(g, a0, a1, a2)
    stride_ac = _select(g, sa0, sa1, sa2)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    kk = tl.arange(0, BLOCK_K)
    r_ok = rows < M
    c_ok = cols < HW
    acc = tl.zeros((BLOCK_M, BLOCK_C), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_ok = k0 + kk < K
        x = tl.load(x_ptr + rows.to(tl.int64)[:, None] * stride_xm + (k0 + kk)[None, :],
                    mask=r_ok[:, None] & k_ok[None, :], other=0.0)
        a = tl.load(a_ptr + cols.to(tl.int64)[:, None] * stride_ac + (k0 + kk)[None, :],
                    mask=c_ok[:, None] & k_ok[None, :], other=0.0)
        if DOT_F32:
            acc += tl.dot(x.to(tl.float32), tl.trans(a.to(tl.float32)), input_precision="ieee")
        else:
            acc += tl.dot(x, tl.trans(a.to(x.dtype)))
    seq = rows // TOKENS_PER_MASK
    sel = tl.load(mask_ptr + seq.to(tl.int64)[:, None] * stride_mm + cols[None, :],
                  mask=r_ok[:, None] & c_ok[None, :], other=0.0).to(tl.float32)
    tl.store(out_ptr + g * stride_og + rows.to(tl.int64)[:, None] * stride_om + cols[None, :], acc * sel,
             mask=r_ok[:, None] & c_ok[None, :])


@triton.jit(do_not_specialize=["M", "HW", "stride_xag", "stride_xam"])
def _lora_expand_group(xa_ptr, b0, b1, b2, y0, y1, y2, M, N0, N1, N2, HW, T0, T1,
                       stride_xag, stride_xam, sb0, sb1, sb2, sy0, sy1, sy2,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, DOT_F32: tl.constexpr):
    pid_m = tl.program_id(0)
    tile = tl.program_id(1)
    # Output-column tiles: T0 of module 0, then T1 of module 1, then module 2's.
    g = tl.where(tile < T0, 0, tl.where(tile < T0 + T1, 1, 2))
    local = tile - tl.where(g == 0, 0, tl.where(g == 1, T0, T0 + T1))
    b_ptr = _select(g, b0, b1, b2)
    y_ptr = _select(g, y0, y1, y2)
    N = _select(g, N0, N1, N2)
    stride_bn = _select(g, sb0, sb1, sb2)
    stride_ym = _select(g, sy0, sy1, sy2)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    n = local * BLOCK_N + tl.arange(0, BLOCK_N)
    cc = tl.arange(0, BLOCK_C)
    r_ok = rows < M
    n_ok = n < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for c0 in range(0, HW, BLOCK_C):
        c_ok = c0 + cc < HW
        xa = tl.load(xa_ptr + g * stride_xag + rows.to(tl.int64)[:, None] * stride_xam + (c0 + cc)[None, :],
                     mask=r_ok[:, None] & c_ok[None, :], other=0.0)
        b = tl.load(b_ptr + n.to(tl.int64)[:, None] * stride_bn + (c0 + cc)[None, :],
                    mask=n_ok[:, None] & c_ok[None, :], other=0.0)
        if DOT_F32:
            acc += tl.dot(xa, tl.trans(b.to(tl.float32)), input_precision="ieee")
        else:
            acc += tl.dot(xa.to(b.dtype), tl.trans(b))
    out = y_ptr + rows.to(tl.int64)[:, None] * stride_ym + n[None, :]
    ok = r_ok[:, None] & n_ok[None, :]
    y = tl.load(out, mask=ok, other=0.0).to(tl.float32)
    tl.store(out, _round(y + acc, y_ptr.dtype.element_ty, _EMULATE_RTNE), mask=ok)


def _padded(items: list, fill):
    return items + [fill] * (MAX_GROUP - len(items))


def lora_group(x: torch.Tensor, a: list[torch.Tensor], b: list[torch.Tensor], ys: list[torch.Tensor],
               mask: torch.Tensor, tokens_per_mask: int = 1) -> None:
    """ys[g] += ((x @ a[g].T) * mask[row // tokens_per_mask]) @ b[g].T, in place, for up to
    MAX_GROUP modules reading the same x `[rows, K]`: a[g] `[hw, K]`, b[g] `[N_g, hw]` (views
    with row strides), ys[g] `[rows, N_g]` with unit column stride. Two launches in all."""
    groups = len(a)
    if not 1 <= groups <= MAX_GROUP or len(b) != groups or len(ys) != groups:
        raise ValueError(f"lora_group takes 1-{MAX_GROUP} modules, got {len(a)}, {len(b)}, {len(ys)}")
    m, k = x.shape
    hw = a[0].shape[0]
    xa = torch.empty(groups, m, hw, dtype=torch.float32, device=x.device)
    bm, bc = _blocks(m), 16 if hw <= 16 else 32 if hw <= 32 else 64
    dot_f32 = INTERPRETING or x.dtype == torch.float32
    pa, sa = _padded(a, a[0]), _padded([t.stride(0) for t in a], a[0].stride(0))
    _lora_shrink_group[(triton.cdiv(m, bm), triton.cdiv(hw, bc), groups)](
        x, *pa, mask, xa, m, k, hw, tokens_per_mask, x.stride(0), *sa, mask.stride(0), xa.stride(0), xa.stride(1),
        BLOCK_M=bm, BLOCK_C=bc, BLOCK_K=128, DOT_F32=dot_f32, num_warps=4)
    block_n = 64
    tiles = [triton.cdiv(y.shape[1], block_n) for y in ys]
    pb, sb = _padded(b, b[0]), _padded([t.stride(0) for t in b], b[0].stride(0))
    py, sy = _padded(ys, ys[0]), _padded([y.stride(0) for y in ys], ys[0].stride(0))
    ns = _padded([y.shape[1] for y in ys], 0)
    t = _padded(tiles, 0)
    _lora_expand_group[(triton.cdiv(m, bm), sum(tiles))](
        xa, *pb, *py, m, *ns, hw, t[0], t[1], xa.stride(0), xa.stride(1), *sb, *sy,
        BLOCK_M=bm, BLOCK_N=block_n, BLOCK_C=32, DOT_F32=INTERPRETING or ys[0].dtype == torch.float32, num_warps=4)


# Row counts and column counts at which the launches above change their tile constexprs.
WARM_ROWS = (1, 17, 33)
WARM_COLUMNS = (1, 17, 33)


def warm_up(groups: list[tuple[list[torch.Tensor], list[torch.Tensor]]], dtype: torch.dtype) -> int:
    """Compile every variant the kernels can reach for these pools, so no request waits for a
    JIT compile: `groups` holds (A pools, B pools) of modules served together (a lone module is
    a group of one). Returns the launches made. GPU only."""
    launches = 0
    seen = set()
    for a_pools, b_pools in groups:
        if INTERPRETING or a_pools[0].device.type != "cuda":
            return 0
        key = (len(a_pools), tuple(a.shape[1] for a in a_pools), tuple(b.shape[0] for b in b_pools))
        if key in seen:
            continue
        seen.add(key)
        k = a_pools[0].shape[1]
        for m in WARM_ROWS:
            for hw in WARM_COLUMNS:
                hw = min(hw, a_pools[0].shape[0])
                x = torch.zeros(m, k, dtype=dtype, device=a_pools[0].device)
                mask = torch.zeros(m, hw, dtype=dtype, device=x.device)
                ys = [torch.zeros(m, b.shape[0], dtype=dtype, device=x.device) for b in b_pools]
                lora_group(x, [a[:hw] for a in a_pools], [b[:, :hw] for b in b_pools], ys, mask)
                launches += 1
    return launches

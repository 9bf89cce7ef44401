"""NF4 matmul kernels (Triton) that read bitsandbytes' packed weights as they are.

bitsandbytes' layout (`Params4bit`, quant_type "nf4"): the weight `[N, K]` flattened row
major, two values per byte, the even element in the high nibble; one absmax per `blocksize`
consecutive values; with double quantization ("nested") that absmax is itself one uint8 code
per block, decoded as `code2[q] * absmax2[block // blocksize2] + offset` in float32.
Dequantization is `code[nibble] * absmax` in float32, cast to the compute dtype.

Two kernels, both reading each packed byte exactly once per program column:

* `_nf4_gemv`: few rows (M <= GEMV_MAX_ROWS). One program owns BLOCK_N output features
  and walks K one quantization block at a time; within a block it sums x * code[nibble] in
  float32 and scales the block's partial sum by the block's absmax once (the same value
  as scaling every weight first, without a multiply per weight). The even and odd inputs
  meet the high and low nibbles directly, so no interleave is needed.
* `_nf4_gemm`: more rows. The same walk, but each block's weights are dequantized to the
  compute dtype in registers (exactly bitsandbytes' values) and fed to `tl.dot` with the
  even / odd input columns: tensor cores, weights read once per BLOCK_M rows.

Both need K to be a multiple of the blocksize (every ChatGLM3/Llama/Qwen projection is);
anything else goes back to bitsandbytes (see `service.inference.kernels.nf4_matmul`).
"""
from __future__ import annotations

import os

import triton
import triton.language as tl

# The interpreter's tl.dot on bfloat16 is wrong (triton 3.9 on CPU); upcast there.
INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
_EMULATE_RTNE = tl.constexpr(INTERPRETING)


@triton.jit
def _round(v, dtype: tl.constexpr, EMULATE_RTNE: tl.constexpr):
    """float32 -> dtype, round to nearest even (the GPU's cast; the interpreter truncates
    to bfloat16, so there it is spelled out on the bits)."""
    if EMULATE_RTNE and dtype == tl.bfloat16:
        u = v.to(tl.uint32, bitcast=True)
        u = u + 0x7FFF + ((u >> 16) & 1)
        return (u >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return v.to(dtype)


@triton.jit
def _block_absmax(aq_ptr, code2_ptr, a2_ptr, offset_ptr, blk, mask, NESTED: tl.constexpr,
                  BLOCKSIZE2: tl.constexpr):
    """Absmax (float32) of quantization blocks `blk` (flat block indices)."""
    if NESTED:
        q = tl.load(aq_ptr + blk, mask=mask, other=0).to(tl.int32)
        a = tl.load(code2_ptr + q) * tl.load(a2_ptr + blk // BLOCKSIZE2, mask=mask, other=0.0) + tl.load(offset_ptr)
    else:
        a = tl.load(aq_ptr + blk, mask=mask, other=0.0)
    return a


@triton.jit
def _nf4_gemv(x_ptr, w_ptr, aq_ptr, code2_ptr, a2_ptr, offset_ptr, lut_ptr, bias_ptr, y_ptr,
              M, N, K, stride_xm, stride_ym,
              NESTED: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCKSIZE: tl.constexpr,
              BLOCKSIZE2: tl.constexpr, BLOCK_N: tl.constexpr, UNROLL: tl.constexpr,
              ROUND_W: tl.constexpr):
    # Row index fastest: the programs of one weight tile run side by side and share it in L2.
    m = tl.program_id(0)
    pid_n = tl.program_id(1)
    HALF: tl.constexpr = BLOCKSIZE // 2  # packed bytes per quantization block
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = n < N
    j = tl.arange(0, HALF)
    kbytes = K // 2
    nblocks = K // BLOCKSIZE  # blocks per weight row
    w_row = w_ptr + n.to(tl.int64)[:, None] * kbytes + j[None, :]
    blk_row = n.to(tl.int64) * nblocks
    x_row = x_ptr + m.to(tl.int64) * stride_xm + 2 * j
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for b0 in range(0, nblocks, UNROLL):
        for u in tl.static_range(UNROLL):  # UNROLL divides nblocks (the launcher picks it)
            b = b0 + u
            packed = tl.load(w_row + b * HALF, mask=n_mask[:, None], other=0).to(tl.int32)
            hi = tl.load(lut_ptr + (packed >> 4))
            lo = tl.load(lut_ptr + (packed & 15))
            xe = tl.load(x_row + b * BLOCKSIZE).to(tl.float32)
            xo = tl.load(x_row + b * BLOCKSIZE + 1).to(tl.float32)
            absmax = _block_absmax(aq_ptr, code2_ptr, a2_ptr, offset_ptr, blk_row + b, n_mask,
                                   NESTED, BLOCKSIZE2)
            if ROUND_W:  # bitsandbytes' dequantized weights exactly: code * absmax in the compute dtype
                hi = _round(hi * absmax[:, None], x_ptr.dtype.element_ty, _EMULATE_RTNE).to(tl.float32)
                lo = _round(lo * absmax[:, None], x_ptr.dtype.element_ty, _EMULATE_RTNE).to(tl.float32)
                acc += tl.sum(hi * xe[None, :] + lo * xo[None, :], axis=1)
            else:  # one multiply per block instead of per weight; differs by the weights' rounding
                acc += tl.sum(hi * xe[None, :] + lo * xo[None, :], axis=1) * absmax
    if HAS_BIAS:
        acc += tl.load(bias_ptr + n, mask=n_mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + m.to(tl.int64) * stride_ym + n, _round(acc, y_ptr.dtype.element_ty, _EMULATE_RTNE),
             mask=n_mask)


@triton.jit
def _nf4_gemm(x_ptr, w_ptr, aq_ptr, code2_ptr, a2_ptr, offset_ptr, lut_ptr, bias_ptr, y_ptr,
              M, N, K, stride_xm, stride_ym,
              NESTED: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCKSIZE: tl.constexpr,
              BLOCKSIZE2: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
              DOT_F32: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    HALF: tl.constexpr = BLOCKSIZE // 2
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    n_mask = n < N
    m_mask = rows < M
    j = tl.arange(0, HALF)
    kbytes = K // 2
    nblocks = K // BLOCKSIZE
    w_row = w_ptr + n.to(tl.int64)[:, None] * kbytes + j[None, :]
    x_row = x_ptr + rows.to(tl.int64)[:, None] * stride_xm + 2 * j[None, :]
    blk_row = n.to(tl.int64) * nblocks
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for b in range(0, nblocks):
        packed = tl.load(w_row + b * HALF, mask=n_mask[:, None], other=0).to(tl.int32)
        absmax = _block_absmax(aq_ptr, code2_ptr, a2_ptr, offset_ptr, blk_row + b, n_mask, NESTED, BLOCKSIZE2)
        # bitsandbytes' dequantized values: float32 code * absmax, rounded to the compute dtype.
        w_hi = _round(tl.load(lut_ptr + (packed >> 4)) * absmax[:, None], x_ptr.dtype.element_ty, _EMULATE_RTNE)
        w_lo = _round(tl.load(lut_ptr + (packed & 15)) * absmax[:, None], x_ptr.dtype.element_ty, _EMULATE_RTNE)
        xe = tl.load(x_row + b * BLOCKSIZE, mask=m_mask[:, None], other=0.0)
        xo = tl.load(x_row + b * BLOCKSIZE + 1, mask=m_mask[:, None], other=0.0)
        if DOT_F32:
            acc += tl.dot(xe.to(tl.float32), tl.trans(w_hi.to(tl.float32)), input_precision="ieee")
            acc += tl.dot(xo.to(tl.float32), tl.trans(w_lo.to(tl.float32)), input_precision="ieee")
        else:
            acc += tl.dot(xe, tl.trans(w_hi))
            acc += tl.dot(xo, tl.trans(w_lo))
    if HAS_BIAS:
        acc += tl.load(bias_ptr + n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    out = y_ptr + rows.to(tl.int64)[:, None] * stride_ym + n[None, :]
    tl.store(out, _round(acc, y_ptr.dtype.element_ty, _EMULATE_RTNE), mask=m_mask[:, None] & n_mask[None, :])

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
def _dequant_tile(w_ptr, aq_ptr, code2_ptr, a2_ptr, offset_ptr, lut_ptr, n, n_mask, b0, kbytes, nblocks,
                  dtype: tl.constexpr, NESTED: tl.constexpr, BLOCKSIZE2: tl.constexpr, HALF: tl.constexpr,
                  NB: tl.constexpr, ROUND_W: tl.constexpr):
    """Weights of rows `n`, quantization blocks b0..b0+NB-1, as two [BLOCK_N, NB, HALF] tiles
    (even and odd K positions: the high and low nibbles of each byte), float32 holding
    bitsandbytes' dequantized values (rounded to `dtype` when ROUND_W). 3-D so each block's
    absmax broadcasts over its bytes without a reshape; each row's bytes are contiguous."""
    blk = b0 + tl.arange(0, NB)
    j = tl.arange(0, HALF)
    row = n.to(tl.int64)[:, None, None]
    off = row * kbytes + (blk * HALF)[None, :, None] + j[None, None, :]
    ok = n_mask[:, None] & (blk < nblocks)[None, :]  # the last step may pass the row's end
    packed = tl.load(w_ptr + off, mask=ok[:, :, None], other=0).to(tl.int32)
    bidx = n.to(tl.int64)[:, None] * nblocks + blk[None, :]
    absmax = _block_absmax(aq_ptr, code2_ptr, a2_ptr, offset_ptr, bidx, ok, NESTED, BLOCKSIZE2)
    absmax = absmax[:, :, None]
    hi = tl.load(lut_ptr + (packed >> 4)) * absmax
    lo = tl.load(lut_ptr + (packed & 15)) * absmax
    if ROUND_W:
        hi = _round(hi, dtype, _EMULATE_RTNE).to(tl.float32)
        lo = _round(lo, dtype, _EMULATE_RTNE).to(tl.float32)
    return hi, lo


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
    kbytes = K // 2
    nblocks = K // BLOCKSIZE  # blocks per weight row
    blk = tl.arange(0, UNROLL)
    kk = (blk * BLOCKSIZE)[:, None] + 2 * tl.arange(0, HALF)[None, :]
    x_row = x_ptr + m.to(tl.int64) * stride_xm + kk
    # Elementwise partial sums; reduced once after the loop (no shuffles per block).
    acc = tl.zeros((BLOCK_N, UNROLL, HALF), dtype=tl.float32)
    for b0 in range(0, nblocks, UNROLL):
        hi, lo = _dequant_tile(w_ptr, aq_ptr, code2_ptr, a2_ptr, offset_ptr, lut_ptr, n, n_mask, b0, kbytes,
                               nblocks, x_ptr.dtype.element_ty, NESTED, BLOCKSIZE2, HALF, UNROLL, ROUND_W)
        x_ok = (b0 + blk < nblocks)[:, None]
        xe = tl.load(x_row + b0 * BLOCKSIZE, mask=x_ok, other=0.0).to(tl.float32)
        xo = tl.load(x_row + b0 * BLOCKSIZE + 1, mask=x_ok, other=0.0).to(tl.float32)
        acc += hi * xe[None, :, :] + lo * xo[None, :, :]
    out = tl.sum(tl.sum(acc, axis=2), axis=1)
    if HAS_BIAS:
        out += tl.load(bias_ptr + n, mask=n_mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + m.to(tl.int64) * stride_ym + n, _round(out, y_ptr.dtype.element_ty, _EMULATE_RTNE),
             mask=n_mask)


@triton.jit
def _nf4_gemm(x_ptr, w_ptr, aq_ptr, code2_ptr, a2_ptr, offset_ptr, lut_ptr, bias_ptr, y_ptr,
              M, N, K, stride_xm, stride_ym,
              NESTED: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCKSIZE: tl.constexpr,
              BLOCKSIZE2: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
              UNROLL: tl.constexpr, DOT_F32: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    HALF: tl.constexpr = BLOCKSIZE // 2
    BK: tl.constexpr = UNROLL * HALF  # even (and odd) K positions per step
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    n_mask = n < N
    m_mask = rows < M
    kbytes = K // 2
    nblocks = K // BLOCKSIZE
    kk = 2 * tl.arange(0, BK)
    x_row = x_ptr + rows.to(tl.int64)[:, None] * stride_xm + kk[None, :]
    dtype: tl.constexpr = x_ptr.dtype.element_ty
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for b0 in range(0, nblocks, UNROLL):
        hi, lo = _dequant_tile(w_ptr, aq_ptr, code2_ptr, a2_ptr, offset_ptr, lut_ptr, n, n_mask, b0, kbytes,
                               nblocks, dtype, NESTED, BLOCKSIZE2, HALF, UNROLL, True)
        # bitsandbytes' dequantized values in the compute dtype, K-major for the dot.
        w_hi = tl.reshape(hi, (BLOCK_N, BK)).to(dtype)
        w_lo = tl.reshape(lo, (BLOCK_N, BK)).to(dtype)
        x_ok = m_mask[:, None] & (b0 * BLOCKSIZE + kk < K)[None, :]
        xe = tl.load(x_row + b0 * BLOCKSIZE, mask=x_ok, other=0.0)
        xo = tl.load(x_row + b0 * BLOCKSIZE + 1, mask=x_ok, other=0.0)
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

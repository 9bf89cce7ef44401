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


# --- tensor-core kernel for every row count: codes looked up in registers, scaled after the dot ---
#
# Why a third kernel: the two above spend one table load (through L1, 64-bit address) and a
# multiply per weight before any math, and the GEMM's 3-D tiles cost layout conversions
# (measured 16-64 GB/s on an H200). `_nf4_mma` instead
# * feeds tensor cores the bare NF4 *code* of each nibble (no per-weight absmax multiply):
#   within one quantization block every weight shares its absmax, so
#   sum_k x_k * code_k * absmax = absmax * (x . code) and the block's dot is scaled once;
# * keeps the code exact: float32 code = hi + lo with hi = bf16(code), lo = bf16(code - hi)
#   (|error| <= 2^-18 |code|, below float32 accumulation's own), two dots per block;
# * looks the codes up with byte permutes (`prmt`) on a 16-entry table held in immediates,
#   8 nibbles per few integer instructions, instead of memory loads (FLUTE's idea); the
#   interpreter cannot run PTX, so there (and with LUT_ASM=False) the table is loaded;
# * reads the packed bytes as bitsandbytes wrote them: a [BLOCK_N, 32] tile of one
#   64-wide K step holds the even K positions in its high nibbles and the odd ones in its
#   low nibbles; by default (`pair`) each byte's two codes are joined in K order into one
#   [BLOCK_N, 64] operand for a single dot with contiguous activations (measured 1.1-1.5x
#   faster than two K=32 dots on even and odd activation columns, kept as pair=False);
# * splits K across programs when the output has too few column tiles to fill the card,
#   each writing float32 partial sums that `_splitk_reduce` adds (deterministic).
# The weight tile is the dot's left operand (swap-AB, as Marlin-class kernels do for small
# batches): the output's N runs along the MMA's M dimension, the few activation rows along
# its N dimension (padded to 16; padded rows re-read row M-1 and are never stored).
STEP_K = tl.constexpr(64)  # K positions per loop step (one dot pair); divides every supported blocksize


def lut_words(values) -> tuple[list[int], list[int]]:
    """The 16 16-bit table entries as byte-permute operands: four words of high bytes and four
    of low bytes, entry e in byte e % 4 of word e // 4."""
    bits = [int(v) & 0xFFFF for v in values]
    hi = [sum(((bits[4 * w + i] >> 8) & 0xFF) << (8 * i) for i in range(4)) for w in range(4)]
    lo = [sum((bits[4 * w + i] & 0xFF) << (8 * i) for i in range(4)) for w in range(4)]
    return hi, lo


def lut_asm(values) -> str:
    """PTX mapping 4 packed bytes ($4) to the 16-bit table entries of their high nibbles
    ($0: bytes 0,1; $1: bytes 2,3) and low nibbles ($2, $3), for `inline_asm_elementwise`
    with pack=4. Per 16-bit half (4 nibbles): prmt selects bytes of entries 0-7 and 8-15
    with the nibbles' low 3 bits, a third prmt picks between them with bit 3, and two more
    interleave high/low bytes into bf16 pairs."""
    th, tl_ = lut_words(values)
    lines = ["{", ".reg .b32 h, s, t, a, b, H, L;"]
    for half, (out_hi, out_lo) in enumerate((("$0", "$2"), ("$1", "$3"))):
        lines.append("mov.b32 h, $4;" if half == 0 else "shr.u32 h, $4, 16;")
        lines += [
            "and.b32 s, h, 0x7777;",
            "shr.u32 t, h, 1;", "and.b32 t, t, 0x4444;", "or.b32 t, t, 0x3210;",
            f"prmt.b32 a, {th[0]:#x}, {th[1]:#x}, s;", f"prmt.b32 b, {th[2]:#x}, {th[3]:#x}, s;",
            "prmt.b32 H, a, b, t;",
            f"prmt.b32 a, {tl_[0]:#x}, {tl_[1]:#x}, s;", f"prmt.b32 b, {tl_[2]:#x}, {tl_[3]:#x}, s;",
            "prmt.b32 L, a, b, t;",
            # fields of h: (byte0 low, byte0 high, byte1 low, byte1 high)
            f"prmt.b32 {out_hi}, L, H, 0x7351;", f"prmt.b32 {out_lo}, L, H, 0x6240;",
        ]
    lines.append("}")
    return "\n".join(lines)


@triton.jit
def _codes(p, lut_ptr, LUT_ASM: tl.constexpr, ASM: tl.constexpr):
    """Table entries (the table's dtype) of the high and low nibbles of packed bytes `p` (uint8)."""
    if LUT_ASM:
        ty = lut_ptr.dtype.element_ty
        hi, lo = tl.inline_asm_elementwise(ASM, "=r,=r,=r,=r,r", [p], dtype=(ty, ty), is_pure=True, pack=4)
    else:
        q = p.to(tl.int32)
        hi = tl.load(lut_ptr + (q >> 4))
        lo = tl.load(lut_ptr + (q & 15))
    return hi, lo


# Row counts and split lengths vary per call: specializing on them (==1, %16) compiled new
# variants in the middle of serving (seconds each: measured as 2-4 s time-to-first-token).
@triton.jit(do_not_specialize=["M", "steps_per_split"])
def _nf4_mma(x_ptr, w_ptr, aq_ptr, code2_ptr, a2_ptr, offset_ptr, lut_ptr, lut2_ptr, bias_ptr, y_ptr, ws_ptr, cnt_ptr,
             M, N, K, stride_xm, stride_ym, steps_per_split,
             NESTED: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCKSIZE: tl.constexpr, BLOCKSIZE2: tl.constexpr,
             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SPLIT: tl.constexpr, SPLIT_CODE: tl.constexpr,
             LUT_ASM: tl.constexpr, ASM: tl.constexpr, ASM2: tl.constexpr, DOT_F32: tl.constexpr,
             SWAP: tl.constexpr, PAIR: tl.constexpr, SERIAL: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_m = tl.program_id(2)
    HALF: tl.constexpr = STEP_K // 2
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    n_mask = n < N
    m_mask = rows < M
    # Out-of-range columns and rows read valid memory (row N-1 / M-1) and are never stored:
    # the loads need no masks and stay vectorised.
    n_in = tl.minimum(n, N - 1)
    rows_in = tl.minimum(rows, M - 1)
    kbytes = K // 2
    nblocks = K // BLOCKSIZE
    j = tl.arange(0, HALF)
    if SWAP:  # weights [BLOCK_N, HALF] as the left operand, activations [HALF, BLOCK_M]
        w_tile = w_ptr + n_in.to(tl.int64)[:, None] * kbytes + j[None, :]
        x_even = x_ptr + rows_in.to(tl.int64)[None, :] * stride_xm + 2 * j[:, None]
        x_pairs = x_ptr + rows_in.to(tl.int64)[None, :] * stride_xm + tl.arange(0, STEP_K)[:, None]
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    else:     # activations [BLOCK_M, HALF] on the left, weights [HALF, BLOCK_N] on the right
        w_tile = w_ptr + n_in.to(tl.int64)[None, :] * kbytes + j[:, None]
        x_even = x_ptr + rows_in.to(tl.int64)[:, None] * stride_xm + 2 * j[None, :]
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    blk_row = n_in.to(tl.int64) * nblocks
    step0 = pid_k * steps_per_split
    step1 = tl.minimum(step0 + steps_per_split, K // STEP_K)
    for step in range(step0, step1):
        p = tl.load(w_tile + step * HALF)
        if PAIR:  # one K=64 dot: each byte's two codes side by side, as K runs (SWAP only)
            xk = tl.load(x_pairs + step * STEP_K)
            if DOT_F32:
                xk = xk.to(tl.float32)
            d = _pair_dot(p, xk, lut_ptr, LUT_ASM, ASM, DOT_F32, BLOCK_N, None)
            if SPLIT_CODE:
                d = _pair_dot(p, xk, lut2_ptr, LUT_ASM, ASM2, DOT_F32, BLOCK_N, d)
        else:
            xe = tl.load(x_even + step * STEP_K)
            xo = tl.load(x_even + step * STEP_K + 1)
            if DOT_F32:  # the interpreter (bf16 dot unreliable there) and float32 inputs
                xe = xe.to(tl.float32)
                xo = xo.to(tl.float32)
            d = _code_dots(p, xe, xo, lut_ptr, LUT_ASM, ASM, DOT_F32, SWAP, None)
            if SPLIT_CODE:
                d = _code_dots(p, xe, xo, lut2_ptr, LUT_ASM, ASM2, DOT_F32, SWAP, d)
        blk = blk_row + (step * STEP_K) // BLOCKSIZE
        absmax = _block_absmax(aq_ptr, code2_ptr, a2_ptr, offset_ptr, blk, n_mask, NESTED, BLOCKSIZE2)
        if SWAP:
            acc += d * absmax[:, None]
        else:
            acc += d * absmax[None, :]
    if SWAP:
        mask = n_mask[:, None] & m_mask[None, :]
        out_off = rows.to(tl.int64)[None, :] * stride_ym + n[:, None]
        part_off = (pid_k * M + rows.to(tl.int64))[None, :] * N + n[:, None]
        bias_ix = n_in[:, None]
    else:
        mask = m_mask[:, None] & n_mask[None, :]
        out_off = rows.to(tl.int64)[:, None] * stride_ym + n[None, :]
        part_off = (pid_k * M + rows.to(tl.int64))[:, None] * N + n[None, :]
        bias_ix = n_in[None, :]
    if not SPLIT:
        if HAS_BIAS:
            acc += tl.load(bias_ptr + bias_ix).to(tl.float32)
        tl.store(y_ptr + out_off, _round(acc, y_ptr.dtype.element_ty, _EMULATE_RTNE), mask=mask)
    else:
        tl.store(ws_ptr + part_off, acc, mask=mask)
        if SERIAL:  # the last split of this tile to finish adds the partials (no reduce launch)
            tl.debug_barrier()  # every thread's partials stored before the release below
            tile = pid_m * tl.num_programs(0) + pid_n
            arrived = tl.atomic_add(cnt_ptr + tile, 1, sem="acq_rel")
            if arrived == tl.num_programs(1) - 1:
                total = tl.zeros_like(acc)
                for split in range(0, tl.num_programs(1)):  # fixed order: as _splitk_reduce adds
                    total += tl.load(ws_ptr + part_off + (split - pid_k) * M * N, mask=mask, other=0.0,
                                     cache_modifier=".cg")
                if HAS_BIAS:
                    total += tl.load(bias_ptr + bias_ix).to(tl.float32)
                tl.store(y_ptr + out_off, _round(total, y_ptr.dtype.element_ty, _EMULATE_RTNE), mask=mask)
                tl.atomic_xchg(cnt_ptr + tile, 0)  # ready for the next launch (graph replays)


@triton.jit
def _code_dots(p, xe, xo, lut_ptr, LUT_ASM: tl.constexpr, ASM: tl.constexpr, DOT_F32: tl.constexpr,
               SWAP: tl.constexpr, acc):
    """The even and odd K positions' dots with one code table (added to `acc` unless None)."""
    hi, lo = _codes(p, lut_ptr, LUT_ASM, ASM)
    if DOT_F32:
        hi = hi.to(tl.float32)
        lo = lo.to(tl.float32)
        if SWAP:
            d = tl.dot(hi, xe, acc, input_precision="ieee")
            d = tl.dot(lo, xo, d, input_precision="ieee")
        else:
            d = tl.dot(xe, hi, acc, input_precision="ieee")
            d = tl.dot(xo, lo, d, input_precision="ieee")
    else:
        if SWAP:
            d = tl.dot(hi, xe, acc)
            d = tl.dot(lo, xo, d)
        else:
            d = tl.dot(xe, hi, acc)
            d = tl.dot(xo, lo, d)
    return d


@triton.jit
def _pair_dot(p, xk, lut_ptr, LUT_ASM: tl.constexpr, ASM: tl.constexpr, DOT_F32: tl.constexpr,
              BLOCK_N: tl.constexpr, acc):
    """[BLOCK_N, 64] codes (byte j's high nibble at K=2j, low at 2j+1) dotted with x [64, BLOCK_M]."""
    hi, lo = _codes(p, lut_ptr, LUT_ASM, ASM)
    w = tl.reshape(tl.join(hi, lo), (BLOCK_N, STEP_K))
    if DOT_F32:
        return tl.dot(w.to(tl.float32), xk, acc, input_precision="ieee")
    return tl.dot(w, xk, acc)


@triton.jit(do_not_specialize=["M"])
def _splitk_reduce(ws_ptr, bias_ptr, y_ptr, M, N, stride_ym, SPLIT_K: tl.constexpr, HAS_BIAS: tl.constexpr,
                   BLOCK: tl.constexpr):
    """y = sum of the SPLIT_K float32 partial products (+ bias), rounded once."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < M * N
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for s in tl.static_range(SPLIT_K):
        acc += tl.load(ws_ptr + s * M * N + offs, mask=mask, other=0.0)
    row = offs // N
    col = offs % N
    if HAS_BIAS:
        acc += tl.load(bias_ptr + col, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + row * stride_ym + col, _round(acc, y_ptr.dtype.element_ty, _EMULATE_RTNE), mask=mask)

"""Our GPU kernels. Public entry: `nf4_matmul(x, weight)` for a bitsandbytes NF4 weight.

`nf4_matmul` returns what `x @ dequantize_4bit(weight.data, weight.quant_state).T` returns
(to the compute dtype's rounding) for any shape; our Triton kernels serve the shapes they
support (K a multiple of the blocksize, rows <= MAX_KERNEL_ROWS) and bitsandbytes serves the
rest, so a shape is never answered wrongly, only more slowly. Importing this package needs
triton; `available()` says whether the kernels can run here (CUDA, or Triton's CPU
interpreter under TRITON_INTERPRET=1 for tests).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass

import torch

try:  # triton is a GPU-host / test dependency; without it everything falls back
    import triton

    from service.inference.kernels import nf4 as _nf4
except ImportError:  # pragma: no cover - exercised only on hosts without triton
    triton = None
    _nf4 = None

# The most rows our kernels can serve; what a caller actually routes to them is its
# `min_rows`..`max_rows` (Settings.nf4_kernel_min_rows / _max_rows: where `_nf4_mma` beats
# bitsandbytes on an H200, see bench/results/h200-2026-12-03b/).
MAX_KERNEL_ROWS = 128
# Blocksize 32 only (`_nf4_mma` needs blocks of 64): up to this many rows the per-weight GEMV
# kernel, above it the 3-D tile GEMM (both slower than `_nf4_mma`; kept for that blocksize).
GEMV_MAX_ROWS = 2


@dataclass(frozen=True)
class LaunchConfig:
    block_n: int
    num_warps: int
    block_m: int = 1      # gemm only
    unroll: int = 1       # gemv only
    round_weights: bool = True  # gemv only: round each dequantized weight as bitsandbytes does
    num_stages: int = 2


GEMV_CONFIG = LaunchConfig(block_n=8, num_warps=4, unroll=8)
if os.environ.get("TUNESERVE_NF4_GEMV_CONFIG"):  # tuning knob: a LaunchConfig as JSON (bench/kernels.py)
    GEMV_CONFIG = LaunchConfig(**json.loads(os.environ["TUNESERVE_NF4_GEMV_CONFIG"]))


def gemm_config(m: int) -> LaunchConfig:
    if m <= 16:
        return LaunchConfig(block_n=32, block_m=16, num_warps=4, unroll=2, num_stages=3)
    if m <= 32:
        return LaunchConfig(block_n=32, block_m=32, num_warps=4, unroll=2, num_stages=3)
    return LaunchConfig(block_n=64, block_m=64, num_warps=4, unroll=2, num_stages=3)


def available(device: torch.device | str | None = None) -> bool:
    if _nf4 is None:
        return False
    if _nf4.INTERPRETING:
        return True
    dev = torch.device(device) if device is not None else None
    return torch.cuda.is_available() and (dev is None or dev.type == "cuda")


@dataclass(frozen=True)
class NF4Operands:
    """Views of one bitsandbytes NF4 weight as our kernels read it (no copies)."""
    packed: torch.Tensor    # uint8 [N * K / 2]
    absmax: torch.Tensor    # uint8 codes [N * K / blocksize] when nested, else float32
    code2: torch.Tensor     # float32 [256] (nested) or a 1-element placeholder
    absmax2: torch.Tensor   # float32 [blocks / blocksize2] (nested) or placeholder
    offset: torch.Tensor    # float32 [1] (nested) or placeholder
    lut: torch.Tensor       # float32 [16]: the NF4 code
    tables: dict            # compute dtype -> CodeTable (the code split for tensor cores)
    counters: torch.Tensor  # int32 zeros, one per output tile: split-K arrivals (serial reduce)
    n: int
    k: int
    blocksize: int
    blocksize2: int
    nested: bool


def operands(weight) -> NF4Operands | None:
    """The kernel operands of a `Params4bit`, or None if our kernels do not cover it."""
    qs = getattr(weight, "quant_state", None)
    if qs is None or qs.quant_type != "nf4" or len(qs.shape) != 2:
        return None
    n, k = (int(s) for s in qs.shape)
    bs = int(qs.blocksize)
    data = weight.data if hasattr(weight, "data") else weight
    if bs < 32 or bs & (bs - 1) or k % bs or data.dtype != torch.uint8 or data.numel() * 2 != n * k:
        return None
    if not data.is_contiguous():
        return None
    if qs.nested:
        s2 = qs.state2
        bs2 = int(s2.blocksize)
        offset = qs.offset if torch.is_tensor(qs.offset) else torch.tensor([float(qs.offset)])
        offset = offset.reshape(1).to(device=data.device, dtype=torch.float32)
        return NF4Operands(data.view(-1), qs.absmax.view(-1), s2.code.float(), s2.absmax.float().view(-1),
                           offset, qs.code.float(), code_tables(qs.code), _counters(n, data.device), n, k, bs, bs2,
                           True)
    placeholder = torch.zeros(1, dtype=torch.float32, device=data.device)
    return NF4Operands(data.view(-1), qs.absmax.float().view(-1), placeholder, placeholder, placeholder,
                       qs.code.float(), code_tables(qs.code), _counters(n, data.device), n, k, bs, 1, False)


# Smallest tiles a serial split-K launch may use (more tiles than counters: the reduce kernel).
SERIAL_MIN_BLOCK_N, SERIAL_MIN_BLOCK_M = 64, 16


def _counters(n: int, device) -> torch.Tensor:
    """Allocated once per weight, before any graph capture, and left zeroed by every launch."""
    tiles = -(-n // SERIAL_MIN_BLOCK_N) * -(-MAX_KERNEL_ROWS // SERIAL_MIN_BLOCK_M)
    return torch.zeros(tiles, dtype=torch.int32, device=device)


@dataclass(frozen=True)
class CodeTable:
    """The 16 code values in one compute dtype for `_nf4_mma`: hi + lo equals the float32 code
    to 2^-18 (lo is zero for float32, where hi is exact), as tensors (loaded where PTX cannot
    run) and as byte-permute PTX (registers only)."""
    hi: torch.Tensor
    lo: torch.Tensor
    asm_hi: str
    asm_lo: str
    split: bool


def code_tables(code: torch.Tensor) -> dict:
    """Per compute dtype, the table `launch_mma` reads (computed once per weight, at setup)."""
    code = code.float()
    tables = {torch.float32: CodeTable(code, torch.zeros_like(code), "", "", False)}
    for dtype in (torch.bfloat16, torch.float16):
        hi = code.to(dtype)
        lo = (code - hi.float()).to(dtype)
        bits = [t.view(torch.int16).tolist() for t in (hi, lo)]
        tables[dtype] = CodeTable(hi, lo, _nf4.lut_asm(bits[0]), _nf4.lut_asm(bits[1]), True)
    return tables


def _unroll(ops: NF4Operands, cfg: LaunchConfig) -> int:
    """Quantization blocks per loop step: the configured count, at most the row's (a power of 2)."""
    nblocks = ops.k // ops.blocksize
    return min(cfg.unroll, triton.next_power_of_2(nblocks))


def launch_gemv(x: torch.Tensor, ops: NF4Operands, out: torch.Tensor, bias: torch.Tensor | None,
                cfg: LaunchConfig = GEMV_CONFIG) -> torch.Tensor:
    m = x.shape[0]
    grid = (m, triton.cdiv(ops.n, cfg.block_n))
    _nf4._nf4_gemv[grid](
        x, ops.packed, ops.absmax, ops.code2, ops.absmax2, ops.offset, ops.lut,
        bias if bias is not None else out, out, m, ops.n, ops.k, x.stride(0), out.stride(0),
        NESTED=ops.nested, HAS_BIAS=bias is not None, BLOCKSIZE=ops.blocksize, BLOCKSIZE2=ops.blocksize2,
        BLOCK_N=cfg.block_n, UNROLL=_unroll(ops, cfg), ROUND_W=cfg.round_weights, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return out


def launch_gemm(x: torch.Tensor, ops: NF4Operands, out: torch.Tensor, bias: torch.Tensor | None,
                cfg: LaunchConfig | None = None) -> torch.Tensor:
    m = x.shape[0]
    cfg = cfg or gemm_config(m)
    grid = (triton.cdiv(ops.n, cfg.block_n), triton.cdiv(m, cfg.block_m))
    _nf4._nf4_gemm[grid](
        x, ops.packed, ops.absmax, ops.code2, ops.absmax2, ops.offset, ops.lut,
        bias if bias is not None else out, out, m, ops.n, ops.k, x.stride(0), out.stride(0),
        NESTED=ops.nested, HAS_BIAS=bias is not None, BLOCKSIZE=ops.blocksize, BLOCKSIZE2=ops.blocksize2,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, UNROLL=_unroll(ops, cfg), DOT_F32=_nf4.INTERPRETING or x.dtype == torch.float32,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return out


@dataclass(frozen=True)
class MmaConfig:
    block_n: int = 128
    block_m: int = 16
    num_warps: int = 4
    num_stages: int = 3
    target_programs: int = 264   # split K until about this many programs run (2 per H200 SM)
    min_steps: int = 4           # ... but give each split at least this many 64-wide K steps
    # One bf16/fp16 code per nibble: each weight within one rounding (2^-8 relative in bf16) of
    # its exact NF4 value, as bitsandbytes' own bf16 dequantization is; 13-27 % faster than
    # True, hi + lo (exact float32 codes, two dots per step; H200, kernels.json "mma_sweep").
    split_code: bool = False
    lut_asm: bool = True         # byte permutes in registers; False: table loads
    swap: bool = True            # weights as the dot's left operand (MMA M = output features)
    # One K=64 dot per step on each byte's two codes joined in K order (swap only) instead of
    # two K=32 dots on the even and odd positions: 1.11-1.55x faster from 1 to 128 rows (H200,
    # bench/results/h200-2026-12-03b/kernels_fma_pair_prefetch.json "mma_pair").
    pair: bool = True
    # Split K: the last program of a tile to finish adds the partial sums itself (an atomic
    # arrival count per tile) instead of a second, reduce launch. Same sums, same order.
    # Opt-in: interpreter-tested, not yet measured on a GPU.
    serial_reduce: bool = False


def mma_config(m: int) -> MmaConfig:
    """Per row count, the config with the least total time over ChatGLM3's four projection
    shapes in bench/kernels.py's sweep (H200; 33-64 rows interpolated, not swept)."""
    if m <= 1:
        return MmaConfig(block_n=256, block_m=16, num_stages=3, target_programs=264)
    if m <= 16:
        return MmaConfig(block_n=128, block_m=16, num_stages=4, target_programs=528)
    if m <= 32:
        return MmaConfig(block_n=128, block_m=32, num_stages=3, target_programs=264)
    if m <= 64:
        return MmaConfig(block_n=128, block_m=64, num_stages=3, target_programs=264)
    return MmaConfig(block_n=128, block_m=128, num_warps=8, num_stages=3, target_programs=264)


# The row counts at which mma_config changes (its buckets' upper ends).
MMA_ROW_BUCKETS = (1, 16, 32, 64, 128)


def warm_up(weights, rows: tuple[int, int]) -> int:
    """Compile every `_nf4_mma` variant the row range `rows` can reach for these (weight,
    bias, compute dtype) triples, so no request waits for a JIT compile; returns how many
    launches that took. GPU only (the interpreter compiles nothing)."""
    seen = set()
    launches = 0
    for weight, ops, bias, dtype in weights:
        key = (ops.n, ops.k, ops.blocksize, ops.nested, bias is not None, dtype)
        if key in seen or _nf4.INTERPRETING or ops.packed.device.type != "cuda":
            continue
        seen.add(key)
        lows = [rows[0]] + [b + 1 for b in MMA_ROW_BUCKETS if rows[0] <= b < rows[1]]
        for m in lows:
            x = torch.zeros(m, ops.k, dtype=dtype, device=ops.packed.device)
            nf4_matmul(x, weight, bias, ops=ops, min_rows=rows[0], max_rows=rows[1])
            launches += 1
    return launches


def mma_split(ops: NF4Operands, m: int, cfg: MmaConfig) -> tuple[int, int]:
    """(programs along K, 64-wide steps per program) for an [m, K] x [K, N] product."""
    steps = ops.k // _nf4.STEP_K.value
    tiles = triton.cdiv(ops.n, cfg.block_n) * triton.cdiv(m, cfg.block_m)
    split = max(1, min(round(cfg.target_programs / tiles), steps // max(cfg.min_steps, 1)))
    per = triton.cdiv(steps, split)
    return triton.cdiv(steps, per), per


def launch_mma(x: torch.Tensor, ops: NF4Operands, out: torch.Tensor, bias: torch.Tensor | None,
               cfg: MmaConfig | None = None) -> torch.Tensor:
    m = x.shape[0]
    cfg = cfg or mma_config(m)
    table = ops.tables[x.dtype]
    split, per = mma_split(ops, m, cfg)
    ws = torch.empty(split, m, ops.n, dtype=torch.float32, device=x.device) if split > 1 else out
    tiles = triton.cdiv(ops.n, cfg.block_n) * triton.cdiv(m, cfg.block_m)
    serial = split > 1 and cfg.serial_reduce and tiles <= ops.counters.numel()
    asm = not _nf4.INTERPRETING and cfg.lut_asm and table.split
    split_code = table.split and cfg.split_code
    grid = (triton.cdiv(ops.n, cfg.block_n), split, triton.cdiv(m, cfg.block_m))
    _nf4._nf4_mma[grid](
        x, ops.packed, ops.absmax, ops.code2, ops.absmax2, ops.offset, table.hi, table.lo,
        bias if bias is not None else out, out, ws, ops.counters, m, ops.n, ops.k, x.stride(0), out.stride(0), per,
        NESTED=ops.nested, HAS_BIAS=bias is not None, BLOCKSIZE=ops.blocksize, BLOCKSIZE2=ops.blocksize2,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, SPLIT=split > 1, SPLIT_CODE=split_code, LUT_ASM=asm,
        ASM=table.asm_hi if asm else "", ASM2=table.asm_lo if asm else "",
        DOT_F32=_nf4.INTERPRETING or x.dtype == torch.float32, SWAP=cfg.swap,
        PAIR=cfg.pair and cfg.swap, SERIAL=serial, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    if split > 1 and not serial:
        block = 1024
        _nf4._splitk_reduce[(triton.cdiv(m * ops.n, block),)](
            ws, bias if bias is not None else out, out, m, ops.n, out.stride(0), SPLIT_K=split,
            HAS_BIAS=bias is not None, BLOCK=block, num_warps=4)
    return out


def _bnb_matmul(x: torch.Tensor, weight, bias: torch.Tensor | None) -> torch.Tensor:
    import bitsandbytes as bnb

    return bnb.matmul_4bit(x, weight.t(), bias=bias, quant_state=weight.quant_state)


def nf4_matmul(x: torch.Tensor, weight, bias: torch.Tensor | None = None,
               ops: NF4Operands | None = None, max_rows: int = MAX_KERNEL_ROWS, min_rows: int = 1) -> torch.Tensor:
    """`x @ dequantize_4bit(weight).T (+ bias)` for x `[..., K]` and an NF4 `Params4bit`.

    `ops` (from `operands(weight)`) may be passed to skip re-deriving the views per call;
    fewer than `min_rows` or more than `max_rows` rows go to bitsandbytes (where it is faster)."""
    ops = ops or operands(weight)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    m = x2.shape[0]
    if (ops is None or not available(x.device) or m < max(min_rows, 1) or m > min(max_rows, MAX_KERNEL_ROWS)
            or x.dtype not in (torch.bfloat16, torch.float16, torch.float32) or x.shape[-1] != ops.k
            or x.device != ops.packed.device):
        return _bnb_matmul(x, weight, bias)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    out = torch.empty(m, ops.n, dtype=x.dtype, device=x.device)
    if ops.blocksize % _nf4.STEP_K.value == 0:
        launch_mma(x2, ops, out, bias)
    elif m <= GEMV_MAX_ROWS:  # blocksize 32: the per-weight kernels
        launch_gemv(x2, ops, out, bias)
    else:
        launch_gemm(x2, ops, out, bias)
    return out.reshape(*lead, ops.n)


__all__ = ["MAX_KERNEL_ROWS", "LaunchConfig", "MmaConfig", "NF4Operands", "available", "launch_mma", "nf4_matmul",
           "operands"]

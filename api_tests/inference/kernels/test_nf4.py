"""NF4 kernels against bitsandbytes' own dequantization (CPU: Triton's interpreter; GPU: the
same checks compiled). The reference is `x @ dequantize_4bit(W).T` evaluated in float64; a
correct kernel is then a faithful rounding of it: within one unit in the last place of the
output dtype, plus the float32 accumulation's worst-case error (gamma_K * sum|x||w|). Both
terms follow from the formats, not from one machine."""
from __future__ import annotations

import copy
import dataclasses

import bitsandbytes as bnb
import bitsandbytes.functional as F
import pytest
import torch

pytest.importorskip("triton", reason="triton has no wheel for this platform (x86-64 Linux only)")

from service.inference import kernels
from service.inference.kernels.linear import NF4Linear, use_nf4_kernels

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def quantized(n: int, k: int, *, nested: bool = True, dtype=torch.bfloat16, blocksize: int = 64, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(n, k, generator=g) * 0.05).to(dtype)
    p = bnb.nn.Params4bit(w, requires_grad=False, quant_type="nf4", compress_statistics=nested,
                          blocksize=blocksize, quant_storage=torch.uint8)
    return p.to(DEVICE)  # quantizes


def reference(x: torch.Tensor, p, bias: torch.Tensor | None, weights: str = "rounded", code_error: float = 0.0):
    """(float64 value of x @ W.T + bias, the bound a faithful result must meet).

    W is bitsandbytes' dequantization: "rounded" is what dequantize_4bit returns (code *
    absmax in float32, cast to the compute dtype), "float32" the same before the cast (the
    exact NF4 value). `code_error` is a kernel's relative error on each code value."""
    qs = p.quant_state
    if weights == "float32":
        qs = copy.copy(qs)
        qs.dtype = torch.float32
    w = F.dequantize_4bit(p.data, qs).double()
    exact = x.double() @ w.T
    if bias is not None:
        exact = exact + bias.double()
    k = x.shape[-1]
    accumulation = ((k + 2) * 2.0 ** -24 + code_error) * (x.double().abs() @ w.abs().T)
    ulp = torch.finfo(x.dtype).eps * exact.abs() + torch.finfo(x.dtype).tiny
    return exact, ulp + accumulation


def assert_faithful(out: torch.Tensor, x, p, bias=None, **reference_kw):
    exact, bound = reference(x, p, bias, **reference_kw)
    assert out.shape == exact.shape and out.dtype == x.dtype
    assert not torch.isnan(out).any(), "unwritten or NaN outputs"
    err = (out.double() - exact).abs()
    worst = (err / bound).max().item()
    assert worst <= 1.0, f"error {err.max().item():.3g} exceeds the rounding bound ({worst:.2f}x)"


CASES = [  # (rows, out N, in K, nested, dtype, blocksize, bias)
    (1, 40, 256, True, torch.bfloat16, 64, False),
    (1, 24, 13696, True, torch.bfloat16, 64, False),    # ChatGLM3's MLP input width
    (3, 24, 13696, True, torch.bfloat16, 64, True),
    (2, 33, 192, False, torch.bfloat16, 64, False),     # 3 blocks a row: the loop's tail is masked
    (17, 40, 512, True, torch.bfloat16, 64, True),      # N not a multiple of any block size
    (5, 72, 1024, True, torch.float16, 128, True),
    (9, 40, 512, True, torch.float32, 64, False),
    (1, 24, 1024, False, torch.bfloat16, 256, True),
]


def case_operands(case):
    """(weight, its kernel operands, x, bias) of one CASES row, seeded by its shape."""
    m, n, k, nested, dtype, bs, has_bias = case
    p = quantized(n, k, nested=nested, dtype=dtype, blocksize=bs, seed=m * 31 + n)
    g = torch.Generator().manual_seed(n + k)
    x = torch.randn(m, k, generator=g).to(dtype).to(DEVICE)
    bias = torch.randn(n, generator=g).to(dtype).to(DEVICE) if has_bias else None
    ops = kernels.operands(p)
    assert ops is not None and ops.nested == nested
    return p, ops, x, bias


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"m{c[0]}-n{c[1]}-k{c[2]}-{str(c[4])[6:]}-bs{c[5]}"
                         f"{'-nested' if c[3] else ''}{'-bias' if c[6] else ''}")
def test_gemv_and_gemm_kernels_equal_bitsandbytes_dequantize(case):
    m, n, dtype = case[0], case[1], case[4]
    p, ops, x, bias = case_operands(case)
    for launch in (kernels.launch_gemv, kernels.launch_gemm):
        out = torch.full((m, n), float("nan"), dtype=dtype, device=DEVICE)  # poison: every element written
        launch(x, ops, out, bias)
        assert_faithful(out, x, p, bias)


# The tensor-core kernel's code is hi + lo (two bf16/fp16 values; float32 inputs use the float32
# code itself): its relative error per code value, read off the tables it uses.
def code_error(dtype, split: bool = True) -> float:
    table = kernels.operands(quantized(16, 64)).tables[dtype]
    code = kernels.operands(quantized(16, 64)).lut.double()
    approx = table.hi.double() + (table.lo.double() if split else 0.0)
    nonzero = code != 0
    assert torch.equal(approx[~nonzero], code[~nonzero])
    return ((approx - code).abs()[nonzero] / code.abs()[nonzero]).max().item()


CODE_ERROR = {dtype: code_error(dtype) for dtype in (torch.bfloat16, torch.float16, torch.float32)}
assert CODE_ERROR[torch.bfloat16] <= 2.0 ** -17 and CODE_ERROR[torch.float16] <= 2.0 ** -19


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"m{c[0]}-n{c[1]}-k{c[2]}-{str(c[4])[6:]}-bs{c[5]}"
                         f"{'-nested' if c[3] else ''}{'-bias' if c[6] else ''}")
def test_mma_kernel_is_faithful_to_exact_nf4(case):
    """`_nf4_mma` scales each block's dot by its absmax; with the code split as hi + lo it
    computes with the exact (float32) NF4 weights rather than their bf16-rounded copy: it is
    held to that exact value, with and without K split across programs (partial sums added by
    the reduce kernel)."""
    m, n, dtype = case[0], case[1], case[4]
    p, ops, x, bias = case_operands(case)
    whole = kernels.MmaConfig(block_n=16, block_m=16, target_programs=1, split_code=True)
    split = dataclasses.replace(whole, block_n=32, target_programs=64, min_steps=1)
    assert kernels.mma_split(ops, m, whole)[0] == 1 and kernels.mma_split(ops, m, split)[0] > 1
    for cfg in (whole, split, dataclasses.replace(split, swap=False), dataclasses.replace(split, pair=False)):
        out = torch.full((m, n), float("nan"), dtype=dtype, device=DEVICE)
        kernels.launch_mma(x, ops, out, bias, cfg)
        assert_faithful(out, x, p, bias, weights="float32", code_error=CODE_ERROR[dtype])


# The default (one code value per nibble): its relative error per code, read off its table.
ONE_CODE_ERROR = {dtype: code_error(dtype, split=False) for dtype in (torch.bfloat16, torch.float16)}
assert 2.0 ** -12 < ONE_CODE_ERROR[torch.bfloat16] <= 2.0 ** -8  # bf16 unit roundoff
DEFAULT_BF16 = dict(weights="float32", code_error=ONE_CODE_ERROR[torch.bfloat16])  # what nf4_matmul serves


@pytest.mark.parametrize("case", [c for c in CASES if c[4] != torch.float32],
                         ids=lambda c: f"m{c[0]}-n{c[1]}-k{c[2]}-{str(c[4])[6:]}-bs{c[5]}")
def test_mma_default_is_faithful_to_nf4_within_one_code_rounding(case):
    """What `nf4_matmul` serves by default: each weight one bf16 (fp16) rounding off its exact
    NF4 value, as bitsandbytes' own dequantization to bf16 is, and nothing worse (split K,
    weights on either side of the dot). The bound is the exact one plus that rounding."""
    m, n, dtype = case[0], case[1], case[4]
    p, ops, x, bias = case_operands(case)
    whole = kernels.MmaConfig(block_n=16, block_m=16, target_programs=1)
    split = dataclasses.replace(whole, block_n=32, target_programs=64, min_steps=1)
    assert not whole.split_code and kernels.mma_config(m).split_code is False
    for cfg in (whole, split, dataclasses.replace(split, swap=False), dataclasses.replace(whole, pair=False)):
        out = torch.full((m, n), float("nan"), dtype=dtype, device=DEVICE)
        kernels.launch_mma(x, ops, out, bias, cfg)
        assert_faithful(out, x, p, bias, weights="float32", code_error=ONE_CODE_ERROR[dtype])
    # bitsandbytes' own bf16 dequantize + matmul meets the same bound.
    ref = F.dequantize_4bit(p.data, p.quant_state).to(dtype)
    theirs = (x.float() @ ref.float().T + (bias.float() if bias is not None else 0)).to(dtype)
    assert_faithful(theirs, x, p, bias, weights="float32", code_error=2.0 ** -8 if dtype == torch.bfloat16 else 2.0 ** -11)  # unit roundoff


@pytest.mark.parametrize("case", [c for c in CASES if c[5] % 64 == 0],
                         ids=lambda c: f"m{c[0]}-n{c[1]}-k{c[2]}-{str(c[4])[6:]}-bs{c[5]}")
def test_serial_split_k_equals_the_reduce_launch_bit_for_bit(case):
    """Split K with the last arriving program adding the partials (no reduce launch) gives the
    very same sums in the same order as the reduce kernel, and leaves its counters at zero for
    the next launch (a CUDA graph replays them)."""
    m, n, dtype = case[0], case[1], case[4]
    p, ops, x, bias = case_operands(case)
    two_launches = kernels.MmaConfig(block_n=64, block_m=16, target_programs=64, min_steps=1)
    serial = dataclasses.replace(two_launches, serial_reduce=True)
    assert kernels.mma_split(ops, m, two_launches)[0] > 1
    outs = []
    for cfg in (two_launches, serial, serial):  # twice: counters must be reset by the first
        out = torch.full((m, n), float("nan"), dtype=dtype, device=DEVICE)
        kernels.launch_mma(x, ops, out, bias, cfg)
        outs.append(out)
        assert int(ops.counters.abs().sum()) == 0
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])
    assert_faithful(outs[1], x, p, bias, **(DEFAULT_BF16 if dtype == torch.bfloat16 else
                                          dict(weights="float32", code_error=ONE_CODE_ERROR.get(dtype, 0.0))))


def test_mma_with_one_code_value_is_not_exact():
    """The bound above has teeth: one bf16 code per nibble (2^-9 off) fails it."""
    p = quantized(40, 512, seed=5)
    x = torch.randn(17, 512, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16).to(DEVICE)
    out = torch.empty(17, 40, dtype=torch.bfloat16, device=DEVICE)
    kernels.launch_mma(x, kernels.operands(p), out, None, kernels.MmaConfig(block_n=16, split_code=False))
    with pytest.raises(AssertionError, match="exceeds the rounding bound"):
        assert_faithful(out, x, p, weights="float32", code_error=CODE_ERROR[torch.bfloat16])


def test_lut_words_put_entry_e_in_byte_e_mod_4():
    from service.inference.kernels.nf4 import lut_asm, lut_words

    hi, lo = lut_words([(0xA0 + e) << 8 | e for e in range(16)])
    assert hi == [0xA3A2A1A0, 0xA7A6A5A4, 0xABAAA9A8, 0xAFAEADAC]
    assert lo == [0x03020100, 0x07060504, 0x0B0A0908, 0x0F0E0D0C]
    asm = lut_asm([(0xA0 + e) << 8 | e for e in range(16)])
    assert asm.count("prmt.b32") == 16 and "0xa3a2a1a0" in asm


def test_entry_point_shapes_and_fallbacks():
    assert kernels.available(DEVICE)
    p = quantized(40, 256)
    x = torch.randn(2, 3, 256).to(torch.bfloat16).to(DEVICE)
    out = kernels.nf4_matmul(x, p, max_rows=8)  # leading dims kept
    assert out.shape == (2, 3, 40)
    assert_faithful(out.reshape(6, 40), x.reshape(6, 256), p, **DEFAULT_BF16)
    # K = 96 is not a multiple of the blocksize: bitsandbytes answers, still right.
    odd = quantized(24, 96)
    assert kernels.operands(odd) is None
    xo = torch.randn(3, 96).to(torch.bfloat16).to(DEVICE)
    ref = bnb.matmul_4bit(xo, odd.t(), quant_state=odd.quant_state)
    assert torch.equal(kernels.nf4_matmul(xo, odd), ref)
    # Fewer rows than the caller's range (one row, where bitsandbytes' GEMV is faster): bitsandbytes.
    x1 = torch.randn(1, 256).to(torch.bfloat16).to(DEVICE)
    assert torch.equal(kernels.nf4_matmul(x1, p, min_rows=2), bnb.matmul_4bit(x1, p.t(), quant_state=p.quant_state))
    # More rows than the kernels serve (a prefill): bitsandbytes too.
    xl = torch.randn(kernels.MAX_KERNEL_ROWS + 1, 256).to(torch.bfloat16).to(DEVICE)
    assert torch.equal(kernels.nf4_matmul(xl, p), bnb.matmul_4bit(xl, p.t(), quant_state=p.quant_state))


def test_nf4_linear_swaps_in_place_and_matches_linear4bit():
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        bnb.nn.Linear4bit(64, 128, bias=True, compute_dtype=torch.bfloat16, quant_type="nf4"),
        torch.nn.GELU(),
        bnb.nn.Linear4bit(128, 40, bias=False, compute_dtype=torch.bfloat16, quant_type="nf4"),
        bnb.nn.Linear4bit(40, 8, bias=False, compute_dtype=torch.bfloat16, quant_type="nf4"),  # K=40: stays
    )
    for layer in (model[0], model[2], model[3]):
        layer.weight.data.normal_(0, 0.05)
        if layer.bias is not None:
            layer.bias.data.normal_(0, 0.1)
    model = model.to(torch.bfloat16).to(DEVICE)  # quantizes
    weights = [model[0].weight, model[2].weight]
    x = torch.randn(3, 64).to(torch.bfloat16).to(DEVICE)
    with torch.no_grad():
        second_ref_in = model[1](model[0](x))
        assert use_nf4_kernels(model) == 2
        assert isinstance(model[0], NF4Linear) and isinstance(model[2], NF4Linear)
        assert model[0].max_rows == kernels.MAX_KERNEL_ROWS  # 3 rows: through our kernels
        assert isinstance(model[3], bnb.nn.Linear4bit)
        assert model[0].weight is weights[0] and model[2].weight is weights[1]  # no copy
        assert_faithful(model[0](x), x, weights[0], model[0].bias, **DEFAULT_BF16)
        assert_faithful(model[2](second_ref_in), second_ref_in, weights[1], **DEFAULT_BF16)
        assert model(x).shape == (3, 8)

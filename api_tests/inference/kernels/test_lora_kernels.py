"""The multi-LoRA kernels against the column-pool math in float64, through MultiLoRALinear
(PyTorch path vs kernel path). Mixed batches: every row must get its own adapter's term
(a row reading another row's columns would be off by a whole LoRA term, far outside the
rounding bound)."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton", reason="triton has no wheel for this platform (x86-64 Linux only)")

from service.inference.lora import LoRAContext, MultiLoRALinear

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def build(fan_in: int, fan_out: int, capacity: int, dtype, seed: int):
    g = torch.Generator().manual_seed(seed)
    base = torch.nn.Linear(fan_in, fan_out, bias=False).to(dtype)
    base.weight.data = (torch.randn(fan_out, fan_in, generator=g) * 0.05).to(dtype)
    ctx = LoRAContext()
    layer = MultiLoRALinear(base.to(DEVICE), "proj", ctx)
    layer.lora_A = (torch.randn(capacity, fan_in, generator=g) * 0.1).to(dtype).to(DEVICE)
    layer.lora_B = (torch.randn(fan_out, capacity, generator=g) * 0.1).to(dtype).to(DEVICE)
    layer.enabled = True
    return layer, ctx


@pytest.mark.parametrize("rows,tokens,fan_in,fan_out,hw,dtype", [
    (1, 1, 256, 72, 8, torch.bfloat16),       # one decode row
    (5, 1, 200, 130, 24, torch.bfloat16),     # mixed decode batch, K/N/hw off every block size
    (3, 7, 96, 40, 40, torch.float16),        # a prefill: 7 tokens share each sequence's mask
    (33, 1, 64, 48, 72, torch.float32),
])
def test_kernel_path_equals_pool_math(rows, tokens, fan_in, fan_out, hw, dtype):
    layer, ctx = build(fan_in, fan_out, capacity=96, dtype=dtype, seed=rows * 7 + hw)
    g = torch.Generator().manual_seed(hw)
    # Adapters own disjoint column sets; row r uses adapter r % 3 (adapter 2 = the base: no columns).
    owners = torch.arange(hw) % 2
    mask = torch.zeros(rows, 1, hw)
    for r in range(rows):
        if r % 3 < 2:
            mask[r, 0] = (owners == r % 3).float()
    mask = mask.to(dtype).to(DEVICE)
    x = torch.randn(rows, tokens, fan_in, generator=g).to(dtype).to(DEVICE)
    ctx.mask, ctx.hw = mask, hw
    with torch.no_grad():
        base_out = layer.base(x)
        ctx.kernels = False
        torch_out = layer(x)
        ctx.kernels = True
        kernel_out = layer(x)
    # float64 value of the same sum, and the bound a faithful kernel meets: the base output's
    # rounding (shared by both paths) is excluded; the LoRA term is accumulated in float32 and
    # added with one rounding to the output dtype.
    xa = x.double() @ layer.lora_A[:hw].double().T * mask.double()
    exact = base_out.double() + xa @ layer.lora_B[:, :hw].double().T
    eps = torch.finfo(dtype).eps
    k = fan_in + hw
    bound = eps * exact.abs() + (k + 2) * 2.0 ** -24 * (
        (x.double().abs() @ layer.lora_A[:hw].double().abs().T) @ layer.lora_B[:, :hw].double().abs().T
    ) + torch.finfo(dtype).tiny
    if dtype != torch.float32:  # the expand reads xa rounded to the operand dtype (tensor cores)
        bound = bound + eps * (xa.abs() @ layer.lora_B[:, :hw].double().abs().T)
    err = (kernel_out.double() - exact).abs()
    assert not torch.isnan(kernel_out).any()
    assert (err <= bound).all(), f"worst {(err / bound).max().item():.2f}x the rounding bound"
    # The PyTorch path rounds twice more (xa, then the term); both must agree to that.
    lora_term = (exact - base_out.double()).abs()
    assert ((torch_out.double() - kernel_out.double()).abs() <= 3 * bound + 2 * eps * lora_term).all()
    # Base rows (no columns) are exactly the base output.
    for r in range(rows):
        if r % 3 == 2:
            assert torch.equal(kernel_out[r], base_out[r])

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


@pytest.mark.parametrize("rows,tokens,dtype,targets", [
    (1, 1, torch.bfloat16, "qkv"),     # one decode row, GQA shapes (k, v narrower than q)
    (6, 1, torch.bfloat16, "qkv"),     # mixed decode batch
    (3, 5, torch.float16, "qv"),       # a prefill, two of three projections wrapped
    (9, 1, torch.float32, "qkv"),
])
def test_grouped_projections_equal_each_modules_own_kernels(rows, tokens, dtype, targets):
    """`project_shared_input` runs the LoRA terms of q, k, v in one shrink and one expand; each
    output must equal what the module's own two kernels give (same float32 sums, same single
    rounding: bit for bit), base rows untouched, unwrapped modules just their base."""
    from service.inference.lora import project_shared_input

    fan_in, hw = 200, 24
    ctx = LoRAContext()
    modules = []
    for i, (name, fan_out) in enumerate((("q", 136), ("k", 40), ("v", 40))):
        layer, _ = build(fan_in, fan_out, capacity=48, dtype=dtype, seed=i + rows)
        layer.ctx = ctx
        modules.append(layer if name in targets else layer.base)
    owners = torch.arange(hw) % 2
    mask = torch.zeros(rows, 1, hw)
    for r in range(rows):
        if r % 3 < 2:
            mask[r, 0] = (owners == r % 3).float()
    ctx.mask, ctx.hw, ctx.kernels = mask.to(dtype).to(DEVICE), hw, True
    x = torch.randn(rows, tokens, fan_in, generator=torch.Generator().manual_seed(rows)).to(dtype).to(DEVICE)
    with torch.no_grad():
        grouped = project_shared_input(modules, x)
        each = [m(x) for m in modules]
        bases = [m.base(x) if isinstance(m, MultiLoRALinear) else m(x) for m in modules]
    for g, e, b, m in zip(grouped, each, bases, modules):
        assert g.shape == e.shape and torch.equal(g, e)
        if not isinstance(m, MultiLoRALinear):
            assert torch.equal(g, b)
        else:
            assert not torch.equal(g, b)  # the term is there
        for r in range(rows):
            if r % 3 == 2:
                assert torch.equal(g[r], b[r])
    # with the kernels off it is the modules' own forward (PyTorch's GEMMs)
    ctx.kernels = False
    with torch.no_grad():
        assert all(torch.equal(a, m(x)) for a, m in zip(project_shared_input(modules, x), modules))

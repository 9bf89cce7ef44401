"""The decode attention kernel against float64 softmax attention (CPU: Triton's interpreter;
GPU: compiled). Its one rounding beyond the output's is the probabilities' cast to the value
dtype for the product (unit roundoff u each): |error| <= u_out |exact| + u_p * (p @ |v|) +
float32 terms. The engine's PyTorch path (`runner.slot_attention`) is held to the same
reference, to show the kernel is not worse than what it replaces."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton", reason="triton has no wheel for this platform (x86-64 Linux only)")

from service.inference.kernels.attention import decode_attention
from service.inference.runner import slot_attention

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def case(rows, heads, kv_heads, dim, kv_len, dtype, seed, max_seq=None):
    g = torch.Generator().manual_seed(seed)
    q = (torch.randn(rows, 1, heads, dim, generator=g) * 2).to(dtype).to(DEVICE).transpose(1, 2)  # as attention makes it
    max_seq = max_seq or kv_len
    cache_k = torch.randn(rows + 1, kv_heads, max_seq, dim, generator=g).to(dtype).to(DEVICE)
    cache_v = torch.randn(rows + 1, kv_heads, max_seq, dim, generator=g).to(dtype).to(DEVICE)
    k, v = cache_k[:rows, :, :kv_len], cache_v[:rows, :, :kv_len]  # views into a slot cache, as update() returns
    pos = torch.randint(0, kv_len, (rows,), generator=g)
    pos[0] = kv_len - 1
    allowed = torch.arange(kv_len)[None, :] <= pos[:, None]
    mask = torch.zeros(rows, 1, 1, kv_len, dtype=dtype)
    mask.masked_fill_(~allowed[:, None, None, :], torch.finfo(dtype).min)
    return q, k, v, mask.to(DEVICE)


def exact(q, k, v, mask, scale):
    group = q.shape[1] // k.shape[1]
    kk = k.double().repeat_interleave(group, dim=1)
    vv = v.double().repeat_interleave(group, dim=1)
    s = q.double() @ kk.transpose(-1, -2) * scale + mask.double()
    p = torch.softmax(s, dim=-1)
    return (p @ vv).transpose(1, 2), (p @ vv.abs()).transpose(1, 2)  # [rows, 1, heads, D]


CASES = [  # rows, heads, kv_heads, dim, kv_len, dtype
    (3, 32, 2, 128, 200, torch.bfloat16),   # ChatGLM3's GQA, kv_len off the block size
    (1, 32, 2, 128, 64, torch.bfloat16),    # one row, one block
    (4, 4, 2, 16, 37, torch.float16),       # tiny Llama
    (2, 6, 2, 80, 130, torch.bfloat16),     # group of 3, head_dim 80: both padded
    (5, 4, 4, 32, 70, torch.float32),       # no GQA, float32
]


@pytest.mark.parametrize("splits", [None, 1, 3])
@pytest.mark.parametrize("rows,heads,kv_heads,dim,kv_len,dtype", CASES + [(1, 32, 2, 128, 700, torch.bfloat16)])
def test_decode_attention_is_faithful_to_softmax_attention(rows, heads, kv_heads, dim, kv_len, dtype, splits):
    """Whole KV ranges per program (1), a range cut in pieces combined by the second kernel (3),
    and the default cut (one long-context row: 6 pieces)."""
    q, k, v, mask = case(rows, heads, kv_heads, dim, kv_len, dtype, seed=rows * 13 + dim, max_seq=kv_len + 9)
    scale = dim ** -0.5
    ours = decode_attention(q, k, v, mask, scale, splits=splits)
    ref, spread = exact(q, k, v, mask, scale)
    assert ours.shape == ref.shape and ours.dtype == dtype and not torch.isnan(ours).any()
    u = torch.finfo(dtype).eps / 2
    u_p = 0.0 if dtype == torch.float32 else u
    # float32 terms: the score sums (dim products) move p by about dim * 2^-24 * |q||k| * scale
    f32 = (dim + kv_len + 8) * 2.0 ** -24 * (1 + (q.double().abs().amax() * k.double().abs().amax() * dim * scale).item())
    bound = 2 * u * ref.abs() + (u_p + f32) * spread + torch.finfo(dtype).tiny
    err = (ours.double() - ref).abs()
    assert (err <= bound).all(), f"worst {(err / bound).max().item():.2f}x the bound"
    # in 16-bit the PyTorch path it replaces is no closer to the exact value (it rounds the raw
    # scores to the activations' dtype; in float32 both are at float32 noise)
    if dtype != torch.float32:
        theirs = slot_attention(object(), q, k, v, mask, scaling=scale)[0]
        assert err.norm() <= (theirs.double() - ref).abs().norm()


def test_long_caches_are_cut_into_pieces_for_few_rows():
    from service.inference.kernels.attention import pieces

    assert pieces(1, 2, 2048) == 16 and pieces(1, 2, 100) == 1 and pieces(128, 2, 2048) == 2
    assert pieces(64, 4, 4096) == 2 and pieces(132, 2, 4096) == 1


def test_decode_attention_bound_has_teeth():
    """A kernel that dropped the mask (attended to future positions) fails the same check."""
    q, k, v, mask = case(3, 32, 2, 128, 200, torch.bfloat16, seed=1)
    ours = decode_attention(q, k, v, None, 128 ** -0.5)
    ref, _ = exact(q, k, v, mask, 128 ** -0.5)
    assert (ours.double() - ref).abs().max() > 0.05

"""Fused RMSNorm and rotary kernels against transformers' own modules (CPU: Triton's
interpreter; GPU: compiled). The rotary kernel rounds as PyTorch's elementwise ops do, so it
must equal transformers bit for bit; the norm may differ where float32 summation order or
rsqrt's last bit moves a rounding: at most one unit in the last place of each of its two
roundings (format-derived, not read off a machine). Compiled for a GPU the rotary kernel is
held to one rounding instead (see its test)."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton", reason="triton has no wheel for this platform (x86-64 Linux only)")

from service.inference.kernels.decoder import rms_norm, rotate, use_fused_ops

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _glm_config(**kw):
    from transformers import GlmConfig

    base = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, head_dim=16, max_position_embeddings=128, partial_rotary_factor=0.5,
                attention_bias=True, pad_token_id=0, eos_token_id=1, bos_token_id=2)
    return GlmConfig(**{**base, **kw})


def _llama_config(**kw):
    from transformers import LlamaConfig

    base = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=128, pad_token_id=0, eos_token_id=1, bos_token_id=2)
    return LlamaConfig(**{**base, **kw})


@pytest.mark.parametrize("n,dtype,wdtype", [(64, torch.bfloat16, torch.bfloat16), (4096, torch.bfloat16, torch.bfloat16),
                                            (100, torch.float32, torch.float32), (96, torch.bfloat16, torch.float32),
                                            (128, torch.float16, torch.float16)])
def test_rms_norm_equals_transformers_to_its_roundings(n, dtype, wdtype):
    from transformers.models.glm.modeling_glm import GlmRMSNorm

    g = torch.Generator().manual_seed(n)
    norm = GlmRMSNorm(n, eps=1e-5)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(n, generator=g) * 0.5 + 1)
    norm = norm.to(device=DEVICE, dtype=wdtype)
    x = (torch.randn(3, 5, n, generator=g) * 3).to(dtype).to(DEVICE)
    with torch.no_grad():
        ref = norm(x)
        ours = rms_norm(x, norm.weight, norm.variance_epsilon)
    assert ours.dtype == ref.dtype and ours.shape == ref.shape
    # two roundings (normed -> input dtype, weight product -> output dtype), one ulp each
    eps = torch.finfo(dtype).eps + torch.finfo(ref.dtype).eps
    err = (ours.double() - ref.double()).abs()
    assert (err <= eps * ref.double().abs() + torch.finfo(ref.dtype).tiny).all(), err.max()
    # and in 16-bit mostly identical (the roundings hide float32's last bit): the kernel
    # computes what transformers computes, not something near it
    if dtype != torch.float32:
        assert (err == 0).double().mean() >= 0.9


@pytest.mark.parametrize("family", ["glm", "llama"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_rotary_equals_transformers_bit_for_bit(family, dtype):
    if family == "glm":
        from transformers.models.glm.modeling_glm import GlmRotaryEmbedding as Rotary
        from transformers.models.glm.modeling_glm import apply_rotary_pos_emb
        cfg, interleaved = _glm_config(), True
    else:
        from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding as Rotary
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb
        cfg, interleaved = _llama_config(), False
    head_dim = 16
    g = torch.Generator().manual_seed(7)
    b, t = 2, 3
    # as the attention makes them: [B, T, H, D] projections viewed as [B, H, T, D]
    q = torch.randn(b, t, 4, head_dim, generator=g).to(dtype).to(DEVICE).transpose(1, 2)
    k = torch.randn(b, t, 2, head_dim, generator=g).to(dtype).to(DEVICE).transpose(1, 2)
    positions = torch.tensor([[0, 1, 2], [5, 9, 40]], device=DEVICE)
    cos, sin = Rotary(cfg).to(DEVICE)(q, positions)
    assert cos.shape[-1] == (head_dim // 2 if family == "glm" else head_dim)  # GLM's rotary is partial
    ref_q, ref_k = apply_rotary_pos_emb(q, k, cos, sin)
    ours_q, ours_k = rotate(q, cos, sin, interleaved), rotate(k, cos, sin, interleaved)
    # Compiled too (the launch turns off FMA contraction, which once merged a rounded product
    # into the sum on an H200): the kernel computes transformers' roundings exactly.
    assert torch.equal(ours_q, ref_q) and torch.equal(ours_k, ref_k)
    assert ours_q.stride() == q.stride()
    # the layouts differ: the other one is wrong here
    assert not torch.equal(rotate(q, cos, sin, not interleaved), ref_q)


@pytest.mark.parametrize("family", ["glm", "llama"])
def test_use_fused_ops_keeps_the_models_logits(family):
    from transformers import GlmForCausalLM, LlamaForCausalLM

    torch.manual_seed(0)
    model = (GlmForCausalLM(_glm_config()) if family == "glm" else LlamaForCausalLM(_llama_config())).eval().to(DEVICE)
    ids = torch.randint(3, 97, (2, 9), generator=torch.Generator().manual_seed(3)).to(DEVICE)
    with torch.no_grad():
        ref = model(ids).logits
        counts = use_fused_ops(model)
        ours = model(ids).logits
    assert counts == {"rms_norm": 2 * 2 + 1, "attention": 2}
    # float32: only the norm's summation order and rsqrt differ, a few ulps through 2 layers
    scale = ref.abs().max()
    assert (ours - ref).abs().max() <= 64 * torch.finfo(torch.float32).eps * scale
    assert not torch.equal(ours, torch.zeros_like(ours))


@pytest.mark.parametrize("family", ["glm", "llama"])
def test_runner_decode_with_fused_ops_equals_without(family, tmp_path):
    """The runner's own path (slot KV cache, slot attention, LoRA rows of two adapters and a
    base row, bucketed decode shapes): prefill and teacher-forced decode logits with the fused
    ops equal those without, to float32 noise (the norm's summation order)."""
    import sys
    from pathlib import Path

    from transformers import GlmForCausalLM, LlamaForCausalLM

    from service.inference.lora import parse_peft_adapter
    from service.inference.runner import ModelRunner

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from inference_helpers import make_peft_adapter

    targets = ["q_proj", "k_proj", "v_proj"]

    def fresh():
        torch.manual_seed(0)
        return (GlmForCausalLM(_glm_config()) if family == "glm" else LlamaForCausalLM(_llama_config())).eval()

    dirs = [make_peft_adapter(fresh(), tmp_path / f"a{i}", seed=10 + i, r=2 + 2 * i, targets=targets) for i in range(2)]
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, 97, (n,), generator=g).tolist() for n in (5, 3, 7)]
    forced = torch.randint(3, 97, (3, 5), generator=g)

    def logits(fused: bool, lora_kernels: bool = False, attention: bool = False):
        runner = ModelRunner(fresh().to(DEVICE), num_slots=4, max_seq_len=64, lora_targets=targets, lora_budget_bytes=1 << 20,
                             device=torch.device(DEVICE), fused_ops=fused, lora_kernels=lora_kernels,
                             decode_attention_kernel=attention)
        assert runner.decode_attention_kernel == (2 if attention else False)
        runner.ctx.kernels = lora_kernels  # the engine asks for them on CUDA only; the interpreter runs them here
        runner.pad_shapes = True
        assert runner.fused_ops == ({"rms_norm": 5, "attention": 2} if fused else {})
        hw = 0
        for slot, d in {0: dirs[0], 2: dirs[1]}.items():
            cols = runner.upload_adapter(parse_peft_adapter(d, runner.shapes, runner.dtype))
            runner.bind_slot(slot, cols)
            hw = max(hw, max(cols) + 1)
        out = []
        with torch.no_grad():
            out.append(runner.prefill([0, 1, 2], prompts, hw))
            runner.pos_buf[:3] = torch.tensor([len(p) for p in prompts])
            for step in range(forced.shape[1]):
                runner.tok_buf[:3] = forced[:, step].to(runner.device)
                nb, kv_len, width = runner.decode_buckets(2, int(runner.pos_buf[:3].max()), hw)
                out.append(runner.decode(nb, kv_len, width)[:3].clone())
                runner.pos_buf[:3] += 1
        return torch.stack(out)

    plain, fused = logits(False), logits(True)
    assert (fused - plain).abs().max() <= 64 * torch.finfo(torch.float32).eps * plain.abs().max()
    # and with the LoRA kernels (q/k/v grouped in one shrink + expand, mixed adapter/base slots)
    grouped = logits(True, lora_kernels=True)
    assert (grouped - plain).abs().max() <= 64 * torch.finfo(torch.float32).eps * plain.abs().max()
    # and with the decode attention kernel too (every kernel of this round at once)
    everything = logits(True, lora_kernels=True, attention=True)
    assert (everything - plain).abs().max() <= 64 * torch.finfo(torch.float32).eps * plain.abs().max()
    assert not torch.equal(everything[1:], grouped[1:])  # the kernel ran: float32 sums in another order


def test_runner_warms_up_each_module_and_each_attentions_qkv_group(monkeypatch):
    """With the LoRA kernels on, the runner compiles their variants at start for every wrapped
    module alone and for each attention's wrapped q/k/v together (what serving launches)."""
    from transformers import GlmForCausalLM

    from service.inference import runner as runner_mod
    from service.inference.kernels import lora_kernels

    served = []
    monkeypatch.setattr(lora_kernels, "warm_up", lambda groups, dtype: served.extend(groups) or len(groups))
    monkeypatch.setattr(runner_mod.ModelRunner, "_kernels_available", lambda self: True)
    runner = runner_mod.ModelRunner(GlmForCausalLM(_glm_config()).eval(), num_slots=2, max_seq_len=32,
                                    lora_targets=["q_proj", "v_proj", "o_proj"], lora_budget_bytes=1 << 20,
                                    device=torch.device("cpu"))
    runner._warm_up_lora_kernels()
    layers = 2
    assert len(served) == 3 * layers + layers  # each module alone, then each attention's q + v
    pairs = [g for g in served if len(g[0]) == 2]
    assert len(pairs) == layers
    attn = runner.model.model.layers[0].self_attn
    assert pairs[0][0][0] is attn.q_proj.lora_A and pairs[0][0][1] is attn.v_proj.lora_A


@pytest.mark.parametrize("family", ["glm", "llama"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("explicit_slots", [False, True])
def test_rotary_into_cache_equals_rotate_then_update_bit_for_bit(family, dtype, explicit_slots):
    """The decode step's fused rotary + KV write (`SlotKVCache.write_decode_rotated`) leaves the
    cache and returns q, K, V exactly as transformers' rotary then `update` do."""
    from service.inference.kvcache import SlotKVCache

    if family == "glm":
        from transformers.models.glm.modeling_glm import GlmRotaryEmbedding as Rotary
        cfg, interleaved = _glm_config(), True
    else:
        from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding as Rotary
        cfg, interleaved = _llama_config(), False
    g = torch.Generator().manual_seed(11)
    rows, heads, kv_heads, dim, slots_n, max_len = 3, 4, 2, 16, 5, 24
    q = torch.randn(rows, 1, heads, dim, generator=g).to(dtype).to(DEVICE).transpose(1, 2)
    k = torch.randn(rows, 1, kv_heads, dim, generator=g).to(dtype).to(DEVICE).transpose(1, 2)
    v = torch.randn(rows, 1, kv_heads, dim, generator=g).to(dtype).to(DEVICE).transpose(1, 2)
    positions = torch.tensor([3, 0, 17], device=DEVICE)
    slots = torch.tensor([4, 0, 2], device=DEVICE) if explicit_slots else None
    cos, sin = Rotary(cfg).to(DEVICE)(q, positions[:, None])

    def cache():
        c = SlotKVCache(num_layers=2, num_slots=slots_n, max_seq_len=max_len, num_kv_heads=kv_heads, head_dim=dim,
                        dtype=dtype, device=torch.device(DEVICE))
        for t in c.keys + c.values:  # stale contents must survive where nothing is written
            t.copy_(torch.randn(t.shape, generator=g).to(dtype))
        c.plan_decode(positions, kv_len=20, slots=slots)
        return c

    ref_cache, ours_cache = cache(), cache()
    for a, b in zip(ref_cache.keys + ref_cache.values, ours_cache.keys + ours_cache.values):
        b.copy_(a)
    ref_q = rotate(q, cos, sin, interleaved)
    ref_k, ref_v = ref_cache.update(rotate(k, cos, sin, interleaved), v, 1)
    ours_q, ours_k, ours_v = ours_cache.write_decode_rotated(1, q, k, v, cos, sin, interleaved)
    assert torch.equal(ours_q, ref_q) and torch.equal(ours_k, ref_k) and torch.equal(ours_v, ref_v)
    for a, b in zip(ref_cache.keys + ref_cache.values, ours_cache.keys + ours_cache.values):
        assert torch.equal(a, b)
    ours_cache.plan_prefill(torch.tensor([0], device=DEVICE), positions[None, :1])
    assert ours_cache.write_decode_rotated(1, q, k, v, cos, sin, interleaved) is None  # prefill: the caller's path

"""The converted ChatGLM3 on CUDA: float32 equals golden, 4-bit NF4 (bf16 compute) loads and
stays close. Skipped without a GPU (CI has none)."""
from __future__ import annotations

import pytest
import torch
from chatglm3_helpers import chat_messages
from safetensors.torch import load_file

from service.models import load_model, render_chat, stop_token_ids

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def _rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def test_cuda_float32_logits_and_greedy_equal_golden(converted, tokenizer, golden, fixture_dir):
    torch.backends.cuda.matmul.allow_tf32 = False
    model = load_model(converted, quantize_4bit=False, device="cuda", compute_dtype=torch.float32)
    ref = load_file(fixture_dir / "golden_logits.safetensors")
    errs = []
    for case in golden["logits_cases"]:
        with torch.no_grad():
            got = model(torch.tensor([case["input_ids"]], device="cuda")).logits[0].float().cpu()
        errs.append(_rel(got, ref[case["key"]].float().reshape(got.shape)))
    print(f"CUDA float32 vs golden, max rel per case: {errs}")
    assert max(errs) <= 1e-5
    for case in golden["greedy_chat"]:
        ids = render_chat(tokenizer, chat_messages(case))
        out = model.generate(torch.tensor([ids], device="cuda"), do_sample=False, max_length=120,
                             eos_token_id=stop_token_ids(tokenizer), pad_token_id=0)
        assert out[0, len(ids):].tolist() == case["generated_ids"]


def test_cuda_nf4_bf16_loads_and_stays_close(converted, golden):
    ref_model = load_model(converted, quantize_4bit=False, device="cuda", compute_dtype=torch.float32)
    model = load_model(converted, quantize_4bit=True, device="cuda")  # bf16 compute by default
    layer = model.model.layers[0].self_attn.q_proj
    assert type(layer).__name__ == "Linear4bit" and layer.weight.quant_state.nested
    coss = []
    for case in golden["logits_cases"]:
        ids = torch.tensor([case["input_ids"]], device="cuda")
        with torch.no_grad():
            a, b = model(ids).logits[0].float(), ref_model(ids).logits[0].float()
        coss.append(torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), 0).item())
    print(f"CUDA NF4/bf16 vs float32 cosine per case: {coss}")
    assert min(coss) > 0.88  # same bound as the CPU test (tiny random weights, see there)

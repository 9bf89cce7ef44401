"""Converted ChatGLM3 computes what the original computed: logits, greedy chat, 4-bit."""
from __future__ import annotations

import torch
from chatglm3_helpers import chat_messages
from safetensors.torch import load_file

from service.models import load_model, render_chat, stop_token_ids

# Measured on the fixture (NF4 + double quant, float32 compute, CPU, bitsandbytes 0.50.2,
# AVX512-BF16 host) against the float32 model, per logits case:
#   max|d| / max|ref|     0.30 .. 0.47
#   cosine similarity     0.916 .. 0.960
#   argmax agreement      45 % .. 65 % of positions
# The fixture's weights are random (std 0.08 everywhere, no structure), the worst case for
# 4-bit; the bounds below leave margin over these figures. Against float32 run on the
# *dequantized* NF4 weights the 4-bit model is within 0.7-0.95 % (max rel; bitsandbytes' CPU
# fast path keeps absmax in bf16) or exactly equal (0.0, hosts without AVX512-BF16, seen on the
# H200 machine's CPU), which is the check that the quantized load itself is right.
NF4_MAX_REL = 0.6
NF4_MIN_COS = 0.88
NF4_VS_DEQUANT_MAX_REL = 0.02


def _rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    return ((a - ref).abs().max() / ref.abs().max()).item()


def _logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float()


def test_logits_match_golden(model_fp32, golden, fixture_dir, golden_tol):
    ref = load_file(fixture_dir / "golden_logits.safetensors")
    for case in golden["logits_cases"]:
        want = ref[case["key"]].float().reshape(len(case["input_ids"]), -1)
        got = _logits(model_fp32, case["input_ids"])
        assert got.shape == want.shape
        assert _rel_err(got, want) <= golden_tol, case["key"]


def _greedy(model, tokenizer, case):
    ids = render_chat(tokenizer, chat_messages(case))
    out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                         do_sample=False, max_length=120, eos_token_id=stop_token_ids(tokenizer),
                         pad_token_id=tokenizer.pad_token_id)
    return out[0, len(ids):].tolist()


def test_greedy_chat_matches_golden(model_fp32, tokenizer, golden):
    for case in golden["greedy_chat"]:
        assert _greedy(model_fp32, tokenizer, case) == case["generated_ids"], case["query"]


def test_plain_transformers_on_converted_dir(converted, golden, fixture_dir, golden_tol):
    # What a user of the converted checkpoint gets with nothing of ours imported.
    from transformers import AutoModelForCausalLM, AutoTokenizer
    tok = AutoTokenizer.from_pretrained(converted)
    model = AutoModelForCausalLM.from_pretrained(converted, dtype=torch.float32).eval()
    assert type(model).__name__ == "GlmForCausalLM"
    ref = load_file(fixture_dir / "golden_logits.safetensors")
    for case in golden["logits_cases"]:
        want = ref[case["key"]].float().reshape(len(case["input_ids"]), -1)
        assert _rel_err(_logits(model, case["input_ids"]), want) <= golden_tol
    for case in golden["greedy_chat"]:
        ids = tok.apply_chat_template(chat_messages(case), add_generation_prompt=True,
                                      tokenize=True, return_dict=True)["input_ids"]
        # generation_config.json carries the stop ids (eos, <|user|>, <|observation|>).
        out = model.generate(torch.tensor([ids]), do_sample=False, max_length=120)
        assert out[0, len(ids):].tolist() == case["generated_ids"]


def test_nf4_4bit_on_cpu_stays_close(converted, golden, fixture_dir, model_fp32):
    import bitsandbytes.functional as bnbf

    model = load_model(converted, quantize_4bit=True, device="cpu")
    q_proj = model.model.layers[0].self_attn.q_proj
    assert type(q_proj).__name__ == "Linear4bit"
    assert q_proj.weight.quant_type == "nf4" and q_proj.weight.quant_state.nested  # double quant
    # float32 model on the dequantized NF4 weights: isolates the quantization itself.
    dequant = load_model(converted, quantize_4bit=False, device="cpu")
    sd = dequant.state_dict()
    for name, mod in model.named_modules():
        if type(mod).__name__ == "Linear4bit":
            sd[name + ".weight"].copy_(bnbf.dequantize_4bit(mod.weight.data, mod.weight.quant_state).float())

    errs, coss, dq_errs = [], [], []
    for case in golden["logits_cases"]:
        ref = _logits(model_fp32, case["input_ids"])
        got = _logits(model, case["input_ids"])
        errs.append(_rel_err(got, ref))
        coss.append(torch.nn.functional.cosine_similarity(got.flatten(), ref.flatten(), 0).item())
        dq_errs.append(_rel_err(got, _logits(dequant, case["input_ids"])))
    print(f"NF4 vs float32: max rel {[round(e, 3) for e in errs]}, cos {[round(c, 3) for c in coss]}; "
          f"vs dequantized float32: {[round(e, 4) for e in dq_errs]}")
    assert 0 < min(errs) and max(errs) < NF4_MAX_REL  # > 0: it really is quantized
    assert min(coss) > NF4_MIN_COS
    assert max(dq_errs) < NF4_VS_DEQUANT_MAX_REL


def test_generate_with_max_new_tokens_does_not_warn_about_max_length(model_fp32, converted):
    """The converted generation_config.json sets no max_length, so transformers' "Both
    `max_new_tokens` and `max_length` seem to have been set" (once per generate call: per
    evaluation batch in a worker) has no source."""
    import json
    import logging

    assert "max_length" not in json.loads((converted / "generation_config.json").read_text())
    seen: list[str] = []

    class _Collect(logging.Handler):
        def emit(self, record):
            seen.append(record.getMessage())

    handler = _Collect(logging.WARNING)
    logger = logging.getLogger("transformers")
    logger.addHandler(handler)
    try:
        model_fp32.generate(torch.tensor([[5, 6, 7]]), attention_mask=torch.ones(1, 3, dtype=torch.long),
                            do_sample=False, max_new_tokens=3, pad_token_id=0)
    finally:
        logger.removeHandler(handler)
    assert not [m for m in seen if "max_length" in m], seen

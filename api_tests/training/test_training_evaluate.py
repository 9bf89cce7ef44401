"""Before/after generation: batched left-padded greedy decoding equals one prompt at a time."""
from __future__ import annotations

import pytest
import torch

from service.core.domain import TrainingSpec
from workers.training.evaluate import before_after, generate, prompts_and_references
from workers.training.model import load_trainable


@pytest.mark.slow
def test_batched_generation_equals_single_and_adapter_differs(converted, tokenizer):
    spec = TrainingSpec(lora_dropout=0.0)
    torch.manual_seed(0)
    model = load_trainable(converted, spec, ["q_proj", "k_proj", "v_proj"], "cpu", gradient_checkpointing=False)
    with torch.no_grad():  # a non-zero adapter, so base and adapter answers can differ
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
    # Short prompts of different lengths (left padding matters), short answers: CPU 4-bit decoding is slow.
    convs = [[{"role": "user", "content": q}, {"role": "assistant", "content": a}]
             for q, a in [("类型#裙*颜色#红色", "红色连衣裙"), ("短", "回答"), ("类型#上衣*材质#针织*风格#休闲", "针织上衣"),
                          ("你好", "你好"), ("类型#裤", "长裤")]]
    hist = [h for h, _ in prompts_and_references(convs, 10)]
    batched = generate(model, tokenizer, hist, device="cpu", max_new_tokens=8, max_prompt_tokens=256,
                       batch_size=5)
    single = [generate(model, tokenizer, [h], device="cpu", max_new_tokens=8, max_prompt_tokens=256)[0]
              for h in hist]
    assert batched == single
    res = before_after(model, tokenizer, convs, device="cpu", max_samples=3, max_new_tokens=8,
                       max_prompt_tokens=256, split="validation")
    assert res["n_samples"] == 3 and len(res["before_after"]) == 3
    assert any(r["base"] != r["adapter"] for r in res["before_after"])
    assert res["before_after"][0]["reference"] == convs[0][-1]["content"]
    assert model.training  # restored after evaluation

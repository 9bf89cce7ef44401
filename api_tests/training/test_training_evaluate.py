"""Before/after generation: batched left-padded greedy decoding equals one prompt at a time."""
from __future__ import annotations

import torch

from service.core.domain import TrainingSpec
from train_helpers import conversations
from workers.training.evaluate import before_after, generate, prompts_and_references
from workers.training.model import load_trainable


def test_batched_generation_equals_single_and_adapter_differs(converted, tokenizer):
    spec = TrainingSpec(lora_dropout=0.0)
    torch.manual_seed(0)
    model = load_trainable(converted, spec, ["q_proj", "k_proj", "v_proj"], "cpu", gradient_checkpointing=False)
    with torch.no_grad():  # a non-zero adapter, so base and adapter answers can differ
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
    convs = conversations(5)
    convs[1] = [{"role": "user", "content": "短"}, {"role": "assistant", "content": "回答"}]  # lengths differ
    hist = [h for h, _ in prompts_and_references(convs, 10)]
    batched = generate(model, tokenizer, hist, device="cpu", max_new_tokens=12, max_prompt_tokens=256,
                       batch_size=5)
    single = [generate(model, tokenizer, [h], device="cpu", max_new_tokens=12, max_prompt_tokens=256)[0]
              for h in hist]
    assert batched == single
    res = before_after(model, tokenizer, convs, device="cpu", max_samples=3, max_new_tokens=12,
                       max_prompt_tokens=256, split="validation")
    assert res["n_samples"] == 3 and len(res["before_after"]) == 3
    assert any(r["base"] != r["adapter"] for r in res["before_after"])
    assert res["before_after"][0]["reference"] == convs[0][-1]["content"]
    assert model.training  # restored after evaluation

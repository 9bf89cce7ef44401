"""Training rows fit the base model's positions (issue 11 item 7): source + target caps are
lowered to the model's position limit (GPT-2 `n_positions`, others `max_position_embeddings`)."""
from __future__ import annotations

import pytest
from tiny_bases import build_tokenizer

from service.core.domain import TrainingSpec
from service.models import position_limit
from workers.training.data import tokenize_conversations


def test_position_limit_reads_each_familys_key():
    from transformers import GPT2Config, LlamaConfig
    assert position_limit(GPT2Config(n_positions=1024)) == 1024
    assert position_limit(LlamaConfig(max_position_embeddings=4096)) == 4096
    assert position_limit({"model_type": "chatglm", "seq_length": 8192}) == 8192
    assert position_limit({"model_type": "toy"}) is None


@pytest.mark.parametrize("train_format", ["chat", "plain"])
def test_rows_are_cut_at_the_position_limit(train_format):
    tok = build_tokenizer("gpt2")
    long = " ".join(["the quick brown fox"] * 40)
    conv = [{"role": "user", "content": "a red coat?"}, {"role": "assistant", "content": long}]
    spec = TrainingSpec(max_source_length=256, max_target_length=256, train_format=train_format)
    uncapped = tokenize_conversations(tok, [conv], spec)
    assert len(uncapped[0]) > 48  # the row is long enough to need the cap
    capped = tokenize_conversations(tok, [conv], spec, max_positions=48)
    assert len(capped[0]) == 48 and capped[0].input_ids == uncapped[0].input_ids[:48]

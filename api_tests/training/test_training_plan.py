"""The memory plan: explicit model, unit-tested on ChatGLM3-6B's shape (meta device, no weights)."""
from __future__ import annotations

import random

import pytest

from service.core.domain import TrainingSpec
from service.core.errors import TrainingError
from workers.training.plan import SLACK, GiB, MemoryModel, choose_plan, model_shape

GB = 10**9


@pytest.fixture(scope="module")
def glm6b():
    from transformers import GlmConfig

    cfg = GlmConfig(vocab_size=65024, hidden_size=4096, intermediate_size=13696, num_hidden_layers=28,
                    num_attention_heads=32, num_key_value_heads=2, head_dim=128, partial_rotary_factor=0.5,
                    attention_bias=True, max_position_embeddings=8192, tie_word_embeddings=False,
                    pad_token_id=0, eos_token_id=2)
    return model_shape(cfg, ["q_proj", "k_proj", "v_proj"], lora_r=8)


@pytest.fixture(scope="module")
def adgen_lengths():
    """AdvertiseGen-like chat rows: content 20-80 tokens, summary 50-250, ~8 template tokens."""
    rng = random.Random(0)
    return [8 + rng.randint(20, 80) + rng.randint(50, 250) for _ in range(2000)]


def test_shape_matches_chatglm3_6b(glm6b):
    assert glm6b.total_params == pytest.approx(6.24e9, rel=0.01)  # SEED_BASELINE: 6.24 B
    # NF4 weights + bf16 embeddings/head ~ 3.74 GiB measured on the H100 (SEED_BASELINE).
    mm = MemoryModel()
    weights = mm.fixed_bytes(glm6b) - glm6b.lora_params * 16 - int(0.75 * GiB)
    assert weights / GiB == pytest.approx(3.74, abs=0.05)


def test_default_plan_fits_16gb_card(glm6b, adgen_lengths):
    # A 16 GB card (e.g. V100/T4 16GB) has ~15 GiB free after the CUDA context.
    budget = 16 * GB - int(0.5 * GiB)
    plan = choose_plan(glm6b, adgen_lengths, TrainingSpec(), budget)
    assert plan.predicted_peak_bytes <= budget * 0.95
    assert plan.micro_batch_tokens >= plan.max_example_tokens
    assert plan.effective_batch_size == 16
    assert plan.packing


def test_large_card_used_fully(glm6b, adgen_lengths):
    small = choose_plan(glm6b, adgen_lengths, TrainingSpec(), 16 * GB)
    big = choose_plan(glm6b, adgen_lengths, TrainingSpec(), 78 * GiB)
    # On 80 GB the whole step (16 rows) is one micro-batch, without recomputation.
    assert big.gradient_accumulation_steps == 1
    assert not big.gradient_checkpointing
    # 16 GB: the same single micro-step, with checkpointing (the host cost of extra micro-steps
    # outweighs recomputation) and fewer layers held dequantized.
    assert small.gradient_accumulation_steps == 1 and small.gradient_checkpointing
    assert big.dense_layers == glm6b.layers > small.dense_layers > 0
    assert small.predicted_peak_bytes <= 16 * GB * (1 - SLACK)
    assert big.predicted_tokens_per_s > small.predicted_tokens_per_s


def test_memory_model_is_monotonic(glm6b):
    mm = MemoryModel()
    a, b = mm.peak_bytes(glm6b, 1024, False), mm.peak_bytes(glm6b, 2048, False)
    assert b > a
    assert mm.peak_bytes(glm6b, 2048, True) < mm.peak_bytes(glm6b, 2048, False)
    for ckpt in (False, True):
        for budget in (12 * GiB, 24 * GiB, 70 * GiB):
            t = mm.max_tokens(glm6b, budget, ckpt)
            assert mm.peak_bytes(glm6b, t, ckpt) <= budget * (1 - SLACK) + 1
            assert mm.peak_bytes(glm6b, t + 50, ckpt) > budget * (1 - SLACK)


def test_checkpointing_chosen_when_it_is_the_only_fit(glm6b):
    lengths = [3000] * 64  # long rows: without recomputation one row does not fit 12 GiB
    plan = choose_plan(glm6b, lengths, TrainingSpec(max_source_length=1000, max_target_length=2100), 12 * GiB)
    assert plan.gradient_checkpointing
    assert plan.micro_batch_tokens >= 3000


def test_impossible_plan_fails_fast(glm6b):
    with pytest.raises(TrainingError) as e:
        choose_plan(glm6b, [300] * 16, TrainingSpec(), 4 * GiB)  # the model alone does not fit
    assert e.value.code == "invalid_plan"
    assert "GiB" in e.value.message
    with pytest.raises(TrainingError) as e:  # 8k-token rows without checkpointing on 16 GB
        choose_plan(glm6b, [8000] * 4, TrainingSpec(gradient_checkpointing=False, max_source_length=4000,
                                                     max_target_length=4000), 16 * GB)
    assert e.value.code == "invalid_plan"
    assert "gradient_checkpointing" in e.value.message


def test_user_micro_batch_is_honoured_or_refused(glm6b, adgen_lengths):
    plan = choose_plan(glm6b, adgen_lengths, TrainingSpec(micro_batch_size=2, packing=False), 78 * GiB)
    assert plan.micro_batch_rows == 2 and plan.gradient_accumulation_steps == 8
    with pytest.raises(TrainingError) as e:
        choose_plan(glm6b, adgen_lengths, TrainingSpec(micro_batch_size=16, gradient_checkpointing=False),
                    16 * GB)
    assert e.value.code == "invalid_plan"


def test_world_size_splits_the_step(glm6b, adgen_lengths):
    plan = choose_plan(glm6b, adgen_lengths, TrainingSpec(batch_size=32), 78 * GiB, world_size=2)
    assert plan.effective_batch_size == 32 and plan.world_size == 2
    assert plan.gradient_accumulation_steps == 1

"""Padding-free packing: the same loss and gradients as padded batches of the same examples."""
from __future__ import annotations

import pytest
import torch

from service.core.domain import TrainingSpec
from train_helpers import conversations
from workers.training.data import IGNORE_INDEX, Example, StepSampler, epoch_order, tokenize_conversations
from workers.training.model import check_packing, load_trainable, micro_batch_loss_sum, trainable_parameters
from workers.training.packing import first_fit_decreasing, micro_batches, packed_row, padded_batch

# fp32 on CPU: packed and padded compute the same sums in a different order, by how much
# depends on the CPU's kernels; tolerances are this many times the noise measured in the test.
NOISE_FACTOR = 8


def test_first_fit_decreasing_and_packed_row_layout():
    assert first_fit_decreasing([5, 3, 4, 2, 6], 8) == [[4, 3], [0, 1], [2]]
    a = Example((10, 11, 12, 13), (IGNORE_INDEX, IGNORE_INDEX, 12, 13))
    b = Example((20, 21, 22), (IGNORE_INDEX, 21, 22))
    mb = packed_row([a, b])
    assert mb.input_ids.tolist() == [[10, 11, 12, 13, 20, 21, 22]]
    assert mb.position_ids.tolist() == [[0, 1, 2, 3, 0, 1, 2]]
    # per-example shift: the last token of `a` predicts nothing (not b's first token)
    assert mb.targets.tolist() == [[IGNORE_INDEX, 12, 13, IGNORE_INDEX, 21, 22, IGNORE_INDEX]]
    assert mb.attention_mask is None and mb.n_tokens == 7 and mb.n_label_tokens == 4
    pb = padded_batch([a, b], pad_id=0)
    # right-padded, no mask (exact under causal attention); labels located on the host
    assert pb.input_ids.shape == (2, 4) and pb.attention_mask is None
    assert pb.input_ids.tolist() == [[10, 11, 12, 13], [20, 21, 22, 0]]
    assert pb.n_label_tokens == 4 and pb.label_index.tolist() == [1, 2, 4, 5]
    assert mb.label_index.tolist() == [1, 2, 4, 5] and mb.cu_seqlens.tolist() == [0, 4, 7]


def test_step_sampler_is_a_pure_function_of_seed_and_position():
    s = StepSampler(10, 4, seed=7)
    steps = [s.next_step() for _ in range(5)]
    assert steps[0] + steps[1] + steps[2] == epoch_order(10, 7, 0)  # last step of the epoch has 2 rows
    assert len(steps[2]) == 2 and sorted(steps[3] + steps[4] + [i for i in epoch_order(10, 7, 1)[8:]]) == list(range(10))
    resumed = StepSampler(10, 4, seed=7, position=type(s.position)(epoch=0, index=8))
    assert resumed.next_step() == steps[2] and resumed.next_step() == steps[3]


@pytest.fixture(scope="module")
def model_and_examples(converted, tokenizer):
    spec = TrainingSpec(lora_dropout=0.0, max_source_length=300, max_target_length=300)
    torch.manual_seed(0)
    model = load_trainable(converted, spec, ["q_proj", "k_proj", "v_proj"], "cpu", gradient_checkpointing=False)
    # LoRA B starts at zero; give it values so the adapter's gradients are not trivially tied.
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    examples = tokenize_conversations(tokenizer, conversations(6), spec)
    assert len({len(e) for e in examples}) > 1  # different lengths: padding matters
    return model, examples


def _loss_and_grads(model, mbs):
    model.zero_grad(set_to_none=True)
    total = 0.0
    for mb in mbs:
        loss = micro_batch_loss_sum(model, mb)
        loss.backward()
        total += float(loss)
    return total, [p.grad.detach().clone() for p in trainable_parameters(model)]


def test_packed_loss_and_grads_equal_padded(model_and_examples):
    model, examples = model_and_examples
    model.train()
    packed = micro_batches(examples, packing=True, token_budget=10_000, rows=1, pad_id=0)
    assert len(packed) == 1 and packed[0].input_ids.shape[0] == 1  # one row, no padding
    padded = micro_batches(examples, packing=False, token_budget=10_000, rows=len(examples), pad_id=0)
    assert len(padded) == 1 and padded[0].input_ids.shape[0] == len(examples)
    several = micro_batches(examples, packing=True, token_budget=max(len(e) for e in examples) + 5,
                            rows=1, pad_id=0)
    assert len(several) > 1
    alone = [packed_row([e]) for e in examples]

    lp, gp = _loss_and_grads(model, packed)
    ld, gd = _loss_and_grads(model, padded)
    ls, gs = _loss_and_grads(model, several)
    la, ga = _loss_and_grads(model, alone)
    # Signal: the same tokens as ONE sequence (continuous positions, attention across
    # examples): what a packing that leaked between examples would compute.
    leaky = [packed_row([Example(tuple(i for e in examples for i in e.input_ids),
                                 tuple(t for e in examples for t in e.targets))])]
    ll, gl = _loss_and_grads(model, leaky)

    def loss_rel(x):
        return abs(x - la) / abs(la)

    def grad_rel(g):  # max abs difference relative to the largest entry, worst tensor
        return max(float((a - b).abs().max() / a.abs().max().clamp_min(1e-12)) for a, b in zip(ga, g))
    # Noise: padded rows against each example alone; neither packs, so nothing can leak there.
    eps = torch.finfo(torch.float32).eps
    loss_tol = NOISE_FACTOR * max(loss_rel(ld), eps)
    grad_tol = NOISE_FACTOR * max(grad_rel(gd), eps)
    print(f"packing noise (padded vs alone): loss {loss_rel(ld):.3g}, grads {grad_rel(gd):.3g}; "
          f"packed {loss_rel(lp):.3g}/{grad_rel(gp):.3g}, several rows {loss_rel(ls):.3g}/{grad_rel(gs):.3g}; "
          f"leaky signal {loss_rel(ll):.3g}/{grad_rel(gl):.3g}")
    assert 100 * loss_tol < loss_rel(ll) and 100 * grad_tol < grad_rel(gl), "noise too close to a leak's effect"
    for name, loss, grads in (("packed", lp, gp), ("several", ls, gs)):
        assert loss_rel(loss) <= loss_tol, (name, loss_rel(loss), loss_tol)
        assert grad_rel(grads) <= grad_tol, (name, grad_rel(grads), grad_tol)
    # packing adds no padding: the packed row is exactly the examples' tokens
    assert packed[0].shape_tokens == sum(len(e) for e in examples) < padded[0].shape_tokens


def test_model_honours_packed_sequences(model_and_examples):
    model, _ = model_and_examples
    assert check_packing(model, "cpu", 500)

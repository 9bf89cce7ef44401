"""Mean token accuracy (argmax of the logits at a label position == the shifted label, over label
tokens only) against a hand computation on the tiny ChatGLM3 fixture (4-bit, CPU): the loss's
own chunked path, packed and padded micro-batches, the validation pass, and one optimizer step
of the training loop accumulated over several micro-batches."""
from __future__ import annotations

import pytest
import torch

from service.core.domain import TrainingSpec
from train_helpers import conversations
from workers.training.data import IGNORE_INDEX, Example, tokenize_conversations
from workers.training.evaluate import validation_metrics
from workers.training.loop import Dist, StepResult, TrainLoop, validation_seconds
from workers.training.model import load_trainable, micro_batch_loss_and_correct, micro_batch_loss_sum
from workers.training.packing import micro_batches, packed_row
from workers.training.plan import MemoryPlan
from workers.training.recipe import NullProgress

# A position counts in the hand computation only if its top-2 logit margin exceeds this many
# times the noise between two legitimate computations of the same logits (alone vs padded).
NOISE_FACTOR = 8


@pytest.fixture()
def model(converted):
    torch.manual_seed(0)
    m = load_trainable(converted, TrainingSpec(lora_dropout=0.0), ["q_proj", "k_proj", "v_proj"], "cpu",
                       gradient_checkpointing=False)
    with torch.no_grad():  # LoRA B starts at zero: give the adapter a say in the logits
        for n, p in m.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    return m


@torch.no_grad()
def _logits_alone(model, e: Example) -> torch.Tensor:
    return model(input_ids=torch.tensor([e.input_ids]), use_cache=False).logits[0].float()


@pytest.fixture()
def hand_batch(model, tokenizer):
    """Examples whose targets are built by hand from the model's own predictions: at every
    third label position a wrong token (argmax + 1), elsewhere the argmax. Positions whose
    argmax is within the noise of a tie are left out (-100). Returns (examples, expected correct,
    label tokens)."""
    spec = TrainingSpec(max_source_length=64, max_target_length=64)
    base = tokenize_conversations(tokenizer, conversations(3), spec)
    model.eval()
    alone = [_logits_alone(model, e) for e in base]
    with torch.no_grad():
        pb = micro_batches(base, packing=False, token_budget=10_000, rows=len(base), pad_id=0)[0]
        padded = model(input_ids=pb.input_ids, use_cache=False).logits.float()
    model.train()
    noise = max(float((padded[r, : len(e)] - la).abs().max()) for r, (e, la) in enumerate(zip(base, alone)))
    scale = max(float(la.abs().max()) for la in alone)
    tol = NOISE_FACTOR * max(noise, torch.finfo(torch.float32).eps * scale)
    vocab = alone[0].shape[-1]
    examples, correct, n = [], 0, 0
    for e, la in zip(base, alone):
        top2 = la.topk(2, dim=-1).values
        pred = la.argmax(-1).tolist()
        labels = [IGNORE_INDEX] * len(e)
        for i, t in enumerate(e.targets):
            if t == IGNORE_INDEX or float(top2[i, 0] - top2[i, 1]) <= 2 * tol:
                continue
            right = n % 3 != 0
            labels[i + 1] = pred[i] if right else (pred[i] + 1) % vocab
            correct += right
            n += 1
        examples.append(Example(tuple(e.input_ids), tuple(labels)))
    assert n > 20 and 0 < correct < n  # a batch that can tell a right count from a wrong one
    return examples, correct, n


def test_loss_path_counts_argmax_hits_at_label_positions_only(model, hand_batch):
    examples, correct, n = hand_batch
    assert sum(e.n_label_tokens for e in examples) == n
    model.train()
    cases = {"packed": micro_batches(examples, packing=True, token_budget=10_000, rows=1, pad_id=0),
             "padded": micro_batches(examples, packing=False, token_budget=10_000, rows=3, pad_id=0),
             "alone": [packed_row([e]) for e in examples]}
    for name, mbs in cases.items():
        for chunk in (3, 4096):  # several checkpointed CE chunks, and one
            hits, labels = 0, 0
            for mb in mbs:
                loss_sum, n_correct = micro_batch_loss_and_correct(model, mb, chunk=chunk)
                assert n_correct.dtype == torch.int64 and not n_correct.requires_grad
                loss_sum.backward()  # the accuracy costs the loss's backward nothing
                hits += int(n_correct)
                labels += mb.n_label_tokens
            assert (hits, labels) == (correct, n), (name, chunk)
    model.zero_grad(set_to_none=True)


def test_validation_metrics_give_the_hand_accuracy_and_the_same_loss(model, hand_batch):
    examples, correct, n = hand_batch
    loss, accuracy = validation_metrics(model, examples, device="cpu", token_budget=10_000, packing=True,
                                        rows=1, pad_id=0)
    assert accuracy == correct / n
    with torch.no_grad():
        model.eval()
        ref = sum(float(micro_batch_loss_sum(model, packed_row([e]))) for e in examples) / n
        model.train()
    assert loss == pytest.approx(ref, rel=1e-5)
    assert model.training  # restored


def _plan(examples, token_budget: int) -> MemoryPlan:
    lengths = [len(e) for e in examples]
    return MemoryPlan(packing=True, gradient_checkpointing=False, micro_batch_tokens=token_budget,
                      micro_batch_rows=1, gradient_accumulation_steps=len(examples),
                      effective_batch_size=len(examples), world_size=1, budget_bytes=0, fixed_bytes=0,
                      per_token_bytes=0, predicted_peak_bytes=0, max_example_tokens=max(lengths),
                      mean_example_tokens=sum(lengths) / len(lengths))


def test_train_step_reports_the_steps_accuracy_over_its_micro_batches(model, hand_batch, tmp_path):
    """The step's accuracy is measured on the logits its loss came from (before the update):
    correct predictions summed over every micro-batch / the step's label tokens."""
    examples, correct, n = hand_batch
    spec = TrainingSpec(batch_size=len(examples), max_steps=1, lora_dropout=0.0)
    plan = _plan(examples, token_budget=max(len(e) for e in examples))  # one example per micro-batch
    assert len(micro_batches(examples, packing=True, token_budget=plan.micro_batch_tokens, rows=1, pad_id=0)) > 1
    loop = TrainLoop(model=model, spec=spec, plan=plan, examples=examples, device="cpu", pad_id=0, total_steps=1,
                     work_dir=tmp_path, progress=NullProgress(), dist_=Dist())
    result = loop.train_step()
    assert isinstance(result, StepResult)
    assert result.label_tokens == n and result.accuracy == correct / n
    assert result.tokens == sum(len(e) for e in examples) and result.loss > 0


def test_validation_seconds_prefers_a_measured_pass_else_bounds_by_the_training_rate():
    assert validation_seconds(1000, 0.002, None) == pytest.approx(2.0)
    assert validation_seconds(1000, 0.002, 0.7) == 0.7  # the same pass, timed
    assert validation_seconds(0, 0.002, None) == 0.0 and validation_seconds(1000, None, None) == 0.0

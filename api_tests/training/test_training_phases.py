"""The phases after the last step on the tiny ChatGLM3 fixture (4-bit, CPU): progress says
`evaluating n/N` with the validation loss filled, the ETA covers evaluation from the first step
on, and a cancel during evaluation stops at the next batch of replies."""
from __future__ import annotations

import pytest

from service.core.domain import TrainingSpec
from service.core.errors import Cancelled
from train_helpers import RecordingProgress, conversations, make_run
from workers.training import run_training

# 3 validation prompts, CPU batches of 4 -> one batch for the base model, one for the adapter.
SPEC = dict(max_steps=3, batch_size=2, max_source_length=48, max_target_length=48, lora_dropout=0.0,
            eval_max_samples=3, eval_max_new_tokens=4)


def _validation() -> list[list[dict]]:
    return conversations(3, offset=100)


def test_eval_estimate_is_an_upper_bound_from_a_timed_probe(models_cache):
    """(seconds > 0, replies = 2 x prompts): one probe batch timed, every reply assumed to run
    to max_new_tokens."""
    from service.models import load_tokenizer, resolve_base_model
    from train_helpers import FIXTURE
    from workers.training.evaluate import eval_seconds_estimate
    from workers.training.model import load_trainable

    path = resolve_base_model(FIXTURE, models_cache)
    model = load_trainable(path, TrainingSpec(lora_dropout=0.0), ["q_proj"], "cpu", gradient_checkpointing=False)
    seconds, replies = eval_seconds_estimate(model, load_tokenizer(path), _validation(), device="cpu", max_samples=3,
                                             max_new_tokens=4, max_prompt_tokens=64, batch_size=4)
    assert replies == 6 and seconds > 0
    assert eval_seconds_estimate(model, load_tokenizer(path), [], device="cpu", max_samples=3, max_new_tokens=4,
                                 max_prompt_tokens=64, batch_size=4) == (0.0, 0)
    assert model.training  # restored


def _fixed_validation_seconds(monkeypatch, seconds: float) -> list[tuple]:
    """Fix the validation-loss pass's estimate (its real value depends on the machine); the
    calls are recorded: (validation tokens, training seconds per token, measured seconds)."""
    import workers.training.loop as loop

    calls: list[tuple] = []

    def fixed(*args):
        calls.append(args)
        return seconds

    monkeypatch.setattr(loop, "validation_seconds", fixed)
    return calls


def test_progress_phases_eval_loss_and_an_eta_that_includes_evaluation(tmp_path, models_cache, monkeypatch):
    """The generation probe's figure and the validation-loss pass's estimate (both fixed here:
    their values depend on the machine) are in every training ETA and in evaluation's first
    ETA; once the validation loss is in, the generation's estimate is what is left."""
    import workers.training.evaluate as evaluate

    monkeypatch.setattr(evaluate, "eval_seconds_estimate", lambda *a, **k: (12.5, 6))
    calls = _fixed_validation_seconds(monkeypatch, 2.0)
    prog = RecordingProgress()
    out = run_training(make_run(tmp_path, models_cache, TrainingSpec(**SPEC), conversations(6), _validation()),
                       prog)
    training = [p for p in prog.progresses if p.phase == "training"]
    evaluating = [p for p in prog.progresses if p.phase == "evaluating"]
    assert [p.step for p in training] == [1, 2, 3]
    assert prog.progresses == training + evaluating  # training first, then evaluation, nothing else
    # At the last step no training is left, yet the ETA is not 0: the validation-loss pass and
    # the generation are still to come.
    assert training[-1].eta_seconds == 2.0 + 12.5 == evaluating[0].eta_seconds
    assert all(p.eta_seconds >= 2.0 + 12.5 for p in training)
    # The estimate is asked with the validation tokens and training's measured pace (no pass
    # was timed: eval_steps is not set).
    val_tokens = sum(len(e) for e in _tokenized_validation(models_cache))
    assert calls and all(c[0] == val_tokens and c[1] > 0 and c[2] is None for c in calls)

    assert evaluating[0].eval_done == 0 and evaluating[0].eval_total == 6  # 3 prompts x (base, adapter)
    assert [p.eval_done for p in evaluating[1:]] == [0, 3, 6]  # after the validation loss, then per batch
    assert evaluating[0].phase_text == "evaluating 0/6" and evaluating[-1].phase_text == "evaluating 6/6"
    assert evaluating[0].eval_loss is None and evaluating[0].eval_mean_token_accuracy is None
    assert all(p.eval_loss == out.report.metrics["eval_loss"] for p in evaluating[1:])
    assert all(p.eval_mean_token_accuracy == out.report.metrics["eval_mean_token_accuracy"] for p in evaluating[1:])
    assert 0 <= out.report.metrics["eval_mean_token_accuracy"] <= 1
    assert evaluating[1].eta_seconds == 12.5  # validation loss done: the generation is left
    assert evaluating[-1].eta_seconds == 0
    assert all(p.step == 3 and p.loss == training[-1].loss for p in evaluating)  # training's numbers kept
    assert all(0 <= p.mean_token_accuracy <= 1 for p in prog.progresses)


def _tokenized_validation(models_cache):
    from service.models import load_tokenizer, resolve_base_model
    from train_helpers import FIXTURE
    from workers.training.data import tokenize_conversations

    tok = load_tokenizer(resolve_base_model(FIXTURE, models_cache))
    return tokenize_conversations(tok, conversations(3, offset=100), TrainingSpec(**SPEC))


def test_eta_counts_every_validation_pass_left_without_generation(tmp_path, models_cache, monkeypatch):
    """eval_steps=1 over 3 steps: passes after steps 1 and 2 (none at the last step) and the
    final one. Each logged ETA counts the passes still to come; with the before/after
    generation off the last step's ETA is the final pass alone (it was 0 before). Passes that
    ran are timed and their measured duration is what the estimate is asked with."""
    calls = _fixed_validation_seconds(monkeypatch, 2.0)
    spec = TrainingSpec(**(SPEC | {"eval_max_samples": 0, "eval_steps": 1}))
    prog = RecordingProgress()
    out = run_training(make_run(tmp_path, models_cache, spec, conversations(6), _validation()), prog)
    training = [p for p in prog.progresses if p.phase == "training"]
    evaluating = [p for p in prog.progresses if p.phase == "evaluating"]
    assert [p.step for p in training] == [1, 2, 3]
    assert training[0].eta_seconds >= 2 * 2.0 and training[1].eta_seconds >= 2.0
    assert training[-1].eta_seconds == 2.0 == evaluating[0].eta_seconds
    assert [p.eta_seconds for p in evaluating[1:]] == [0.0]  # validation loss in, nothing left
    assert all(c[2] is not None and c[2] > 0 for c in calls)  # every ETA came after a timed pass
    # Each in-loop pass reports its loss and token accuracy in a metrics event (the CSV's source).
    passes = [d for _, m, d in prog.events if "validation loss" in m and d and "eval_loss" in d]
    assert [d["step"] for d in passes] == [1, 2, 3]
    assert all(0 <= d["eval_mean_token_accuracy"] <= 1 for d in passes)
    assert passes[-1]["eval_mean_token_accuracy"] == out.report.metrics["eval_mean_token_accuracy"]


class _CancelDuringEvaluation(RecordingProgress):
    """Cancel once the base model's replies are in (eval_done == 3 of 6)."""

    def should_stop(self) -> bool:
        self.stop_checks += 1
        return any(p.phase == "evaluating" and (p.eval_done or 0) >= 3 for p in self.progresses)


def test_cancel_during_evaluation_stops_at_the_next_batch(tmp_path, models_cache):
    prog = _CancelDuringEvaluation()
    run = make_run(tmp_path, models_cache, TrainingSpec(**SPEC), conversations(6), _validation())
    with pytest.raises(Cancelled, match="during evaluation"):
        run_training(run, prog)
    # The adapter's batch was never generated, and nothing is left to publish.
    assert max(p.eval_done or 0 for p in prog.progresses) == 3
    assert not any("evaluating on 3 validation prompts: adapter" in m for m in prog.messages())
    assert not (run.work_dir / "adapter").exists()

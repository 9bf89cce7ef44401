"""run_training on the tiny ChatGLM3 fixture in 4-bit NF4 on CPU: real steps, cancellation,
typed failures, what the outcome hands to the registry."""
from __future__ import annotations

import json

import pytest
import torch

from service.core.domain import TrainingSpec
from service.core.errors import Cancelled, TrainingError
from train_helpers import RecordingProgress, conversations, make_run
from workers.training import list_checkpoints, run_training

def short_validation() -> list[list[dict]]:
    return [[{"role": "user", "content": q}, {"role": "assistant", "content": "红色连衣裙"}] for q in ("红色", "裙子", "你好")]


FAST = dict(eval_max_samples=0, max_source_length=48, max_target_length=48, lora_dropout=0.0)


def test_two_real_steps_reduce_loss_on_a_repeated_sample(tmp_path, models_cache):
    sample = conversations(1)[0]
    spec = TrainingSpec(max_steps=3, batch_size=2, learning_rate=2e-2, **FAST)
    prog = RecordingProgress()
    out = run_training(make_run(tmp_path, models_cache, spec, [sample] * 4), prog)
    losses = [p.loss for p in prog.progresses]
    assert len(losses) == 3
    assert losses[1] < losses[0] and losses[2] < losses[1], losses
    # The outcome is a PEFT adapter pair + the registry manifest's fields.
    assert (out.adapter_dir / "adapter_config.json").is_file()
    assert (out.adapter_dir / "adapter_model.safetensors").is_file()
    cfg = json.loads((out.adapter_dir / "adapter_config.json").read_text())
    assert sorted(cfg["target_modules"]) == ["k_proj", "q_proj", "v_proj"]
    m = out.adapter.manifest_fields(out.report)
    assert m["model_family"] == "chatglm3" and m["r"] == 8 and m["lora_alpha"] == 32
    assert m["target_modules"] == ["q_proj", "k_proj", "v_proj"] and m["job_id"] == "ftjob-test"
    assert m["base_model_fingerprint"] and m["training"]["memory_plan"]["packing"] is True
    assert out.report.trained_tokens == m["training"]["trained_tokens"] > 0
    last = prog.progresses[-1]
    assert last.step == last.total_steps == 3
    assert last.tokens_per_second > 0 and 0 < last.label_tokens_per_second < last.tokens_per_second
    assert last.eta_seconds == 0 and last.learning_rate is not None
    assert any(m.startswith("memory plan:") for m in prog.messages())
    assert prog.stop_checks == 3 + 1  # asked before every step, and once more before evaluation


def test_cancel_stops_at_the_next_step_and_leaves_no_adapter(tmp_path, models_cache):
    spec = TrainingSpec(max_steps=50, batch_size=2, checkpoint_steps=1000, **FAST)
    prog = RecordingProgress(stop_after_steps=2)
    run = make_run(tmp_path, models_cache, spec, conversations(8))
    with pytest.raises(Cancelled):
        run_training(run, prog)
    assert [p.step for p in prog.progresses] == [1, 2]  # stopped before step 3
    assert not (run.work_dir / "adapter").exists()
    assert not any(p.name.startswith(".adapter") for p in run.work_dir.iterdir())


def test_invalid_data_is_a_typed_error(tmp_path, models_cache):
    spec = TrainingSpec(max_steps=1, batch_size=2, **FAST)
    no_reply = [[{"role": "user", "content": "只有问题"}]]
    with pytest.raises(TrainingError) as e:
        run_training(make_run(tmp_path, models_cache, spec, no_reply), RecordingProgress())
    assert e.value.code == "invalid_data"
    # Every row truncated before its reply: no label token left.
    long_prompt = [[{"role": "user", "content": "很长的内容" * 200}, {"role": "assistant", "content": "好"}]]
    with pytest.raises(TrainingError) as e:
        run_training(make_run(tmp_path, models_cache, spec, long_prompt * 3), RecordingProgress())
    assert e.value.code == "invalid_data"
    # plain format needs single-turn rows
    multi = [conversations(1)[0] * 2]
    with pytest.raises(TrainingError) as e:
        run_training(make_run(tmp_path, models_cache, spec.model_copy(update={"train_format": "plain"}), multi),
                     RecordingProgress())
    assert e.value.code == "invalid_data" and e.value.param == "train_format"


def test_rows_without_labels_are_dropped_with_a_warning(tmp_path, models_cache):
    spec = TrainingSpec(max_steps=1, batch_size=2, **FAST)
    long_prompt = [{"role": "user", "content": "很长的内容" * 200}, {"role": "assistant", "content": "好"}]
    prog = RecordingProgress()
    run_training(make_run(tmp_path, models_cache, spec, conversations(3) + [long_prompt]), prog)
    warns = prog.messages("warn")
    assert any("dropped 1 of 4 training rows" in w for w in warns), warns


def test_plain_format_trains(tmp_path, models_cache):
    spec = TrainingSpec(max_steps=1, batch_size=2, train_format="plain", **FAST)
    out = run_training(make_run(tmp_path, models_cache, spec, conversations(4)), RecordingProgress())
    assert out.report.steps == 1


def test_missing_base_model_and_cuda_without_cuda(tmp_path, models_cache):
    spec = TrainingSpec(max_steps=1, batch_size=2, **FAST)
    run = make_run(tmp_path, models_cache, spec, conversations(2))
    run.base_model_ref = str(tmp_path / "no-such-model")
    with pytest.raises(TrainingError) as e:
        run_training(run, RecordingProgress())
    assert e.value.code == "model_not_found"
    if not torch.cuda.is_available():
        run = make_run(tmp_path, models_cache, spec, conversations(2))
        run.device = "cuda"
        with pytest.raises(TrainingError) as e:
            run_training(run, RecordingProgress())
        assert "CUDA is not available" in e.value.message


def test_impossible_plan_fails_before_loading(tmp_path, models_cache):
    spec = TrainingSpec(max_steps=1, batch_size=2, **FAST)
    run = make_run(tmp_path, models_cache, spec, conversations(2), memory_budget_bytes=10_000)
    with pytest.raises(TrainingError) as e:
        run_training(run, RecordingProgress())
    assert e.value.code == "invalid_plan"


def test_validation_loss_quality_table_and_checkpoints(tmp_path, models_cache):
    spec = TrainingSpec(max_steps=4, batch_size=2, checkpoint_steps=2, eval_steps=2, eval_max_samples=3,
                        eval_max_new_tokens=4, max_source_length=48, max_target_length=48)
    prog = RecordingProgress()
    out = run_training(make_run(tmp_path, models_cache, spec, conversations(8), short_validation()),
                       prog)
    q = out.report.metrics["quality"]
    assert q["split"] == "validation" and q["n_samples"] == 3 and len(q["before_after"]) == 3
    row = q["before_after"][0]
    assert set(row) == {"prompt", "reference", "base", "adapter"}
    for side in ("base", "adapter"):
        assert set(q[side]) >= {"bleu-4", "rouge-1", "rouge-2", "rouge-l"}
    assert "sentence-level" in q["metric_descriptions"]["bleu-4"]
    assert out.report.metrics["eval_loss"] > 0
    assert any(d and "eval_loss" in d and d.get("step") == 2 for _, _, d in prog.events)
    cks = list_checkpoints(tmp_path / "job")
    assert [c["step"] for c in cks] == [2]  # the final step is the adapter, not a checkpoint
    assert cks[0]["loss"] > 0 and cks[0]["created_at"]


def test_one_cleanup_destroys_the_process_group_once_on_failure(tmp_path, models_cache, monkeypatch):
    """A data-parallel rank that fails after joining the group (here: its base model is gone)
    leaves through the recipe's one cleanup, which destroys the group it started, once."""
    import torch.distributed as dist

    calls: list[str] = []
    state = {"up": False}
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(dist, "is_initialized", lambda: state["up"])
    monkeypatch.setattr(dist, "init_process_group", lambda backend: calls.append(f"init {backend}") or state.update(up=True))
    monkeypatch.setattr(dist, "get_rank", lambda: 0)
    monkeypatch.setattr(dist, "get_world_size", lambda: 2)
    monkeypatch.setattr(dist, "destroy_process_group", lambda: calls.append("destroy") or state.update(up=False))
    run = make_run(tmp_path, models_cache, TrainingSpec(max_steps=1, batch_size=2, **FAST), conversations(2))
    run.base_model_ref = str(tmp_path / "no-such-model")
    with pytest.raises(TrainingError) as e:
        run_training(run, RecordingProgress())
    assert e.value.code == "model_not_found"
    assert calls == ["init gloo", "destroy"]

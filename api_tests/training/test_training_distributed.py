"""Data-parallel launch path on CPU: torchrun, 2 processes, gloo, the tiny 4-bit model. Two
ranks must train the same adapter as one process (same rows per step, gradients summed)."""
from __future__ import annotations

import sys

import pytest
from safetensors.torch import load_file

from service.core.domain import TrainingSpec
from train_helpers import RecordingProgress, conversations, make_run
from workers.training import run_training
from workers.training.distributed import launch_command

SPEC = TrainingSpec(max_steps=2, batch_size=4, eval_max_samples=0, max_source_length=48, max_target_length=48,
                    lora_dropout=0.0, learning_rate=5e-3)
# fp32 on CPU; the two ranks add their halves of the gradient in another order. Measured 3.2e-7.
TOLERANCE = 5e-6  # fp32 summation-order noise: 1.5e-6 seen once padded rows lost their mask


def test_launch_command():
    cmd = launch_command("/w/launch/run.json", 4, python="/venv/bin/python")
    assert cmd == ["/venv/bin/python", "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=4",
                   "-m", "workers.training.distributed", "/w/launch/run.json"]
    assert launch_command("r.json", 2)[0] == sys.executable


@pytest.mark.slow
def test_two_cpu_ranks_train_the_same_adapter_as_one_process(tmp_path, models_cache):
    train = conversations(8)
    one = run_training(make_run(tmp_path / "one", models_cache, SPEC, train), RecordingProgress())
    prog = RecordingProgress()
    two = run_training(make_run(tmp_path / "two", models_cache, SPEC.model_copy(update={"n_gpus": 2}), train),
                       prog)
    assert any("launching data-parallel training on 2 processes" in m for m in prog.messages())
    assert [p.step for p in prog.progresses] == [1, 2]  # rank 0's progress relayed to the caller
    assert two.report.throughput["world_size"] == 2
    assert two.report.trained_tokens == one.report.trained_tokens
    for (s1, l1), (s2, l2) in zip(one.report.loss_history, two.report.loss_history):
        assert s1 == s2 and l1 == pytest.approx(l2, abs=1e-5)
    wa = load_file(str(one.adapter_dir / "adapter_model.safetensors"))
    wb = load_file(str(two.adapter_dir / "adapter_model.safetensors"))
    diff = max(float((wa[k] - wb[k]).abs().max()) for k in wa)
    print(f"1 process vs 2 ranks: max |diff| over adapter tensors = {diff:.3g}")
    assert diff <= TOLERANCE


@pytest.mark.slow
def test_cancel_reaches_every_rank(tmp_path, models_cache):
    spec = SPEC.model_copy(update={"n_gpus": 2, "max_steps": 400})
    prog = RecordingProgress(stop_after_steps=3)  # the parent polls should_stop while ranks train
    from service.core.errors import Cancelled
    run = make_run(tmp_path, models_cache, spec, conversations(8))
    with pytest.raises(Cancelled):
        run_training(run, prog)
    assert not (run.work_dir / "adapter").exists()

"""Checkpoint/resume: a run killed with SIGKILL after a checkpoint resumes from it and ends with
the same adapter as an uninterrupted run with the same seed."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from safetensors.torch import load_file

from service.core.domain import TrainingSpec
from train_helpers import FIXTURE, RecordingProgress, conversations, make_run
from workers.training import list_checkpoints, run_training

# 8 rows, batch 2: 4 steps per epoch, so steps 5-6 also cross an epoch boundary (new permutation).
# Dropout stays on (0.05) so the restored RNG state matters.
SPEC = TrainingSpec(max_steps=6, batch_size=2, checkpoint_steps=2, learning_rate=5e-3, warmup_ratio=0.2,
                    lr_scheduler="cosine", eval_max_samples=0, max_source_length=48, max_target_length=48,
                    seed=1234)
# Measured max |A - B| over all adapter tensors: 0.0 (bit-identical on CPU fp32). Allowed:
TOLERANCE = 1e-6

KILLER = textwrap.dedent("""
    import json, os, signal, sys
    from pathlib import Path
    from service.core.domain import TrainingSpec
    from workers.training import TrainingRun, run_training
    cfg = json.loads(sys.argv[1])

    class KillAfter:
        def event(self, message, *, level="info", data=None): pass
        def should_stop(self): return False
        def progress(self, p, trained_tokens):
            if p.step >= cfg["kill_after"]:
                os.kill(os.getpid(), signal.SIGKILL)  # a worker lost mid-job: no cleanup runs

    run = TrainingRun(job_id="ftjob-test", tenant="t1", base_model_ref=cfg["base"],
                      spec=TrainingSpec.model_validate(cfg["spec"]), train_conversations=cfg["train"],
                      work_dir=Path(cfg["work_dir"]), device="cpu", models_cache_dir=Path(cfg["cache"]))
    run_training(run, KillAfter())
""")


@pytest.mark.slow
def test_sigkilled_run_resumes_and_matches_uninterrupted(tmp_path, models_cache):
    train = conversations(8)
    prog_a = RecordingProgress()
    out_a = run_training(make_run(tmp_path / "a", models_cache, SPEC, train), prog_a)

    work_b = tmp_path / "b" / "job"
    cfg = {"base": str(FIXTURE), "spec": SPEC.model_dump(mode="json"), "train": train, "work_dir": str(work_b),
           "cache": str(models_cache), "kill_after": 3}
    proc = subprocess.run([sys.executable, "-c", KILLER, json.dumps(cfg)], cwd=Path(__file__).parents[2],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert [c["step"] for c in list_checkpoints(work_b)] == [2]  # step 3 ran but was never saved
    assert not (work_b / "adapter").exists()

    prog_b = RecordingProgress()
    out_b = run_training(make_run(tmp_path / "b", models_cache, SPEC, train), prog_b)
    assert out_b.report.resumed_from_step == 2
    assert any("resuming from checkpoint step 2" in m for m in prog_b.messages())
    # The loss curve continues where the checkpoint left it (steps 3..6 only, same values).
    assert [p.step for p in prog_b.progresses] == [3, 4, 5, 6]
    hist_a = out_a.report.loss_history
    hist_b = out_b.report.loss_history
    assert [s for s, _ in hist_b] == [1, 2, 3, 4, 5, 6]
    for (sa, la), (sb, lb) in zip(hist_a, hist_b):
        assert sa == sb and abs(la - lb) <= 1e-6, (sa, la, lb)
    assert out_a.report.trained_tokens == out_b.report.trained_tokens

    wa = load_file(str(out_a.adapter_dir / "adapter_model.safetensors"))
    wb = load_file(str(out_b.adapter_dir / "adapter_model.safetensors"))
    assert wa.keys() == wb.keys() and wa
    max_diff = max(float((wa[k] - wb[k]).abs().max()) for k in wa)
    print(f"resume equivalence: max |A - B| over adapter tensors = {max_diff:.3g}")
    assert max_diff <= TOLERANCE, max_diff
    # and training moved the adapter away from its initialisation
    assert max(float(wa[k].abs().max()) for k in wa if "lora_B" in k) > 0


def test_checkpoint_of_other_data_is_not_resumed(tmp_path, models_cache):
    spec = SPEC.model_copy(update={"max_steps": 2, "checkpoint_steps": 1})
    run_training(make_run(tmp_path, models_cache, spec, conversations(4)), RecordingProgress())
    prog = RecordingProgress()
    out = run_training(make_run(tmp_path, models_cache, spec, conversations(4, offset=50)), prog)
    assert out.report.resumed_from_step is None
    assert any("ignoring checkpoint" in m for m in prog.messages("warn"))


def test_half_written_checkpoint_is_ignored(tmp_path, models_cache):
    spec = SPEC.model_copy(update={"max_steps": 3, "checkpoint_steps": 1})
    run_training(make_run(tmp_path, models_cache, spec, conversations(4)), RecordingProgress())
    root = tmp_path / "job" / "checkpoints"
    (root / ".tmp-step-9-123").mkdir()  # a crash mid-write
    (root / "step-8").mkdir()  # renamed dir without state.json (cannot happen, still not trusted)
    assert [c["step"] for c in list_checkpoints(tmp_path / "job")] == [1, 2]


def test_next_attempt_removes_a_killed_attempts_half_written_checkpoint(tmp_path, models_cache):
    """A worker SIGKILLed inside save_checkpoint leaves `.step-N.tmp-*`; the job's next attempt
    removes it (nothing half-done left once the job ends) and keeps the complete ones."""
    spec = SPEC.model_copy(update={"max_steps": 2, "checkpoint_steps": 1})
    run_training(make_run(tmp_path, models_cache, spec, conversations(4)), RecordingProgress())
    root = tmp_path / "job" / "checkpoints"
    complete = [c["step"] for c in list_checkpoints(tmp_path / "job")]
    assert complete
    partial = root / ".step-3.tmp-k1ll3d"
    partial.mkdir()
    (partial / "optimizer.pt").write_bytes(b"half")
    prog = RecordingProgress()
    run_training(make_run(tmp_path, models_cache, spec, conversations(4)), prog)  # the same job, again
    assert not partial.exists()
    assert not list(root.glob(".*tmp*"))
    assert [c["step"] for c in list_checkpoints(tmp_path / "job")] == complete  # the complete ones kept
    assert any("half-written checkpoint .step-3.tmp-k1ll3d" in message for _, message, _ in prog.events)
    assert any(f"resuming from checkpoint step {complete[-1]}" in message for _, message, _ in prog.events)


def test_corrupt_newest_checkpoint_falls_back_to_the_previous(tmp_path, models_cache):
    spec = SPEC.model_copy(update={"max_steps": 3, "checkpoint_steps": 1})
    train = conversations(4)
    run_training(make_run(tmp_path, models_cache, spec, train), RecordingProgress())
    root = tmp_path / "job" / "checkpoints"
    (root / "step-2" / "optimizer.pt").write_bytes(b"not a torch file")
    prog = RecordingProgress()
    out = run_training(make_run(tmp_path, models_cache, spec.model_copy(update={"max_steps": 3}), train), prog)
    assert out.report.resumed_from_step == 1
    assert any("step-2 cannot be restored" in m for m in prog.messages("warn"))

"""GPU path of the training core (skipped without CUDA): bf16 compute, everything on the GPU."""
from __future__ import annotations

import pytest
import torch

from service.core.domain import TrainingSpec
from train_helpers import RecordingProgress, conversations, make_run

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def test_tiny_model_trains_on_cuda_in_bf16(tmp_path, models_cache):
    from workers.training import run_training
    from workers.training.model import load_trainable

    spec = TrainingSpec(max_steps=3, batch_size=4, learning_rate=1e-2, eval_max_samples=2, eval_max_new_tokens=8,
                        max_source_length=64, max_target_length=64)
    run = make_run(tmp_path, models_cache, spec, conversations(8))
    run.device = "cuda"
    prog = RecordingProgress()
    out = run_training(run, prog)
    assert out.report.steps == 3 and out.report.throughput["device"] == "cuda:0"
    assert out.report.throughput["peak_memory_gib"] > 0
    from service.models import resolve_base_model
    model = load_trainable(resolve_base_model(run.base_model_ref, models_cache), spec, ["q_proj", "k_proj", "v_proj"],
                           "cuda:0", gradient_checkpointing=False)
    assert all(p.device.type == "cuda" for p in model.parameters())
    assert all(p.dtype == torch.float32 for p in model.parameters() if p.requires_grad)  # LoRA master weights
    frozen = {p.dtype for p in model.parameters() if not p.requires_grad}
    assert torch.float32 not in frozen  # 4-bit codes + bf16, no fp32 upcast left

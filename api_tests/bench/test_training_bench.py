"""bench/training.py's MFU counts the frozen base's linear weights: the count must be the model's."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

# Loaded by path under its own name: putting bench/ on sys.path would shadow real top-level
# modules with bench scripts (bench/kernels.py hid the `kernels` package transformers imports).
_PATH = Path(__file__).resolve().parents[2] / "bench" / "training.py"
_spec = importlib.util.spec_from_file_location("tuneserve_bench_training", _PATH)
training = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(training)


def test_frozen_linear_params_are_the_decoder_layers_linear_weights():
    from transformers import GlmForCausalLM

    cfg = training.glm_config(tiny=True)
    model = GlmForCausalLM(cfg)
    weights = sum(m.weight.numel() for m in model.model.layers.modules() if isinstance(m, torch.nn.Linear))
    assert training.frozen_linear_params(cfg) == weights
    # ChatGLM3-6B: 5.71 B of its 6.24 B parameters (the rest: embeddings, head, norms, biases)
    assert round(training.frozen_linear_params(training.glm_config(tiny=False)) / 1e9, 2) == 5.71

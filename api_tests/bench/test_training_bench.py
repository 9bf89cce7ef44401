"""bench/training.py's MFU counts the frozen base's linear weights: the count must be the model's."""
from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

import training  # noqa: E402


def test_frozen_linear_params_are_the_decoder_layers_linear_weights():
    from transformers import GlmForCausalLM

    cfg = training.glm_config(tiny=True)
    model = GlmForCausalLM(cfg)
    weights = sum(m.weight.numel() for m in model.model.layers.modules() if isinstance(m, torch.nn.Linear))
    assert training.frozen_linear_params(cfg) == weights
    # ChatGLM3-6B: 5.71 B of its 6.24 B parameters (the rest: embeddings, head, norms, biases)
    assert round(training.frozen_linear_params(training.glm_config(tiny=False)) / 1e9, 2) == 5.71

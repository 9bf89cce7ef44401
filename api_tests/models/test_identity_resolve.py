"""service.models.identity.resolve_identity: the base's files read once into its identity
(path, family, fingerprint, default LoRA targets, position limit, device), the one
resolution the trainer and the engine share."""
from __future__ import annotations

import json

import torch
from chatglm3_helpers import FIXTURE
from safetensors.torch import save_file

from service.core.config import Settings
from service.core.identity import BaseModelIdentity
from service.models import base_model_fingerprint, checkpoint_weight_names, default_lora_targets, resolve_base_model
from service.models import resolve_identity


def test_resolves_the_chatglm3_fixture_once(tmp_path):
    cache = tmp_path / "cache"
    ident = resolve_identity(BaseModelIdentity.of(str(FIXTURE), Settings(data_dir=tmp_path)), cache, device="cpu")
    converted = resolve_base_model(FIXTURE, cache)
    assert ident.resolved and ident.path == str(converted)
    assert ident.public_id == "chatglm3-tiny" and ident.ref == str(FIXTURE)  # naming unchanged
    assert ident.family == "chatglm3" and ident.default_targets == ("q_proj", "k_proj", "v_proj")
    assert ident.fingerprint == base_model_fingerprint(converted) is not None
    seq = json.loads((FIXTURE / "config.json").read_text())["seq_length"]
    assert ident.position_limit == seq and ident.device == "cpu"


def test_unknown_family_targets_from_checkpoint_headers(tmp_path):
    """Without loading the model: the checkpoint's tensor names decide, as the loaded model's
    Linear names would (default_lora_targets(family, model))."""
    save_file({"h.0.attn.c_attn.weight": torch.zeros(12, 4), "h.0.attn.c_attn.bias": torch.zeros(12),
               "h.0.mlp.c_fc.weight": torch.zeros(8, 4)}, str(tmp_path / "model.safetensors"))
    names = checkpoint_weight_names(tmp_path)
    assert sorted(names) == ["h.0.attn.c_attn.bias", "h.0.attn.c_attn.weight", "h.0.mlp.c_fc.weight"]
    assert default_lora_targets("toy", weight_names=names) == ["c_attn"]
    assert default_lora_targets("toy", weight_names=[]) == ["q_proj", "k_proj", "v_proj"]
    assert checkpoint_weight_names(tmp_path / "missing") == []

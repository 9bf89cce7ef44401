"""Export of a q/k/v LoRA adapter to ChatGLM3's fused query_key_value layout."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from service.core.errors import AdapterMismatch
from service.models.export import export_adapter_chatglm3

LAYERS, HIDDEN, HEADS, GROUPS, KV = 3, 64, 4, 2, 16
Q_OUT, KV_OUT = HEADS * KV, GROUPS * KV


@pytest.fixture()
def trained_adapter(converted, tmp_path):
    """A PEFT adapter on the converted fixture (q/k/v, r 4, alpha 8) with random A and B."""
    from peft import LoraConfig, get_peft_model
    from service.models import load_model
    model = load_model(converted, quantize_4bit=False)
    peft = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,
                                            target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                                            task_type="CAUSAL_LM"))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in peft.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    peft.save_pretrained(tmp_path / "adapter")
    return tmp_path / "adapter", peft


class _Skeleton(torch.nn.Module):
    def prepare_inputs_for_generation(self, *args, **kwargs):  # PeftModelForCausalLM wants it
        return {}


def _original_skeleton():
    """Modules named exactly as in ChatGLM3's modeling_chatglm (no remote code needed)."""
    root = _Skeleton()
    root.transformer = torch.nn.Module()
    root.transformer.encoder = torch.nn.Module()
    layers = torch.nn.ModuleList()
    for _ in range(LAYERS):
        layer = torch.nn.Module()
        layer.self_attention = torch.nn.Module()
        layer.self_attention.query_key_value = torch.nn.Linear(HIDDEN, Q_OUT + 2 * KV_OUT)
        layer.self_attention.dense = torch.nn.Linear(Q_OUT, HIDDEN, bias=False)
        layers.append(layer)
    root.transformer.encoder.layers = layers
    return root


def test_fused_delta_equals_concatenated_qkv_deltas(trained_adapter, tmp_path):
    adapter, _ = trained_adapter
    out = export_adapter_chatglm3(adapter, tmp_path / "exported")
    src, dst = load_file(adapter / "adapter_model.safetensors"), load_file(out / "adapter_model.safetensors")
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert (cfg["r"], cfg["lora_alpha"]) == (12, 24.0)  # 3r, 3 alpha: scaling alpha/r unchanged
    assert cfg["target_modules"] == ["dense", "query_key_value"]
    scale_old, scale_new = 8 / 4, cfg["lora_alpha"] / cfg["r"]
    for i in range(LAYERS):
        p = f"base_model.model.model.layers.{i}.self_attn."
        deltas = [src[f"{p}{m}_proj.lora_B.weight"] @ src[f"{p}{m}_proj.lora_A.weight"] * scale_old
                  for m in "qkv"]
        f = f"base_model.model.transformer.encoder.layers.{i}.self_attention.query_key_value."
        fused = dst[f + "lora_B.weight"] @ dst[f + "lora_A.weight"] * scale_new
        assert fused.shape == (Q_OUT + 2 * KV_OUT, HIDDEN)
        torch.testing.assert_close(fused, torch.cat(deltas), rtol=1e-6, atol=1e-7)
        d = f"base_model.model.transformer.encoder.layers.{i}.self_attention.dense."
        assert torch.equal(dst[d + "lora_A.weight"], src[p + "o_proj.lora_A.weight"])


def test_peft_loads_export_onto_original_names_and_computes_the_same(trained_adapter, tmp_path):
    from peft import LoraConfig, PeftModel
    adapter, glm_peft = trained_adapter
    out = export_adapter_chatglm3(adapter, tmp_path / "exported")
    config = LoraConfig.from_pretrained(out)
    assert "query_key_value" in config.target_modules

    skeleton = _original_skeleton()
    glm = glm_peft.base_model.model.model
    with torch.no_grad():  # the original's fused base weights = our split ones, concatenated
        for i, layer in enumerate(skeleton.transformer.encoder.layers):
            attn = glm.layers[i].self_attn
            layer.self_attention.query_key_value.weight.copy_(torch.cat(
                [attn.q_proj.base_layer.weight, attn.k_proj.base_layer.weight, attn.v_proj.base_layer.weight]))
            layer.self_attention.query_key_value.bias.copy_(torch.cat(
                [attn.q_proj.base_layer.bias, attn.k_proj.base_layer.bias, attn.v_proj.base_layer.bias]))
    loaded = PeftModel.from_pretrained(skeleton, out)
    x = torch.randn(5, HIDDEN, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        for i in range(LAYERS):
            attn = glm.layers[i].self_attn
            want = torch.cat([attn.q_proj(x), attn.k_proj(x), attn.v_proj(x)], dim=-1)
            got = loaded.base_model.model.transformer.encoder.layers[i].self_attention.query_key_value(x)
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_partial_qkv_is_refused(converted, tmp_path):
    from peft import LoraConfig, get_peft_model
    from service.models import load_model
    peft = get_peft_model(load_model(converted, quantize_4bit=False),
                          LoraConfig(r=2, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    peft.save_pretrained(tmp_path / "qv")
    with pytest.raises(AdapterMismatch):
        export_adapter_chatglm3(tmp_path / "qv", tmp_path / "out")
    assert not (tmp_path / "out").exists()

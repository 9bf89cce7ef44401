"""resolve_base_model: hash-keyed conversion cache, crash safety, .bin shards, demo model,
pass-through of other model types; config mapping details."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from chatglm3_helpers import FIXTURE
from safetensors.torch import load_file

from service.core.errors import InvalidInput
from service.models import (DEFAULT_LORA_TARGETS, build_demo_model, default_lora_targets,
                            load_model, load_tokenizer, model_family, render_chat,
                            resolve_base_model, stop_token_ids, tokenize_chat)
from service.models import chatglm3 as cg


def _copy(tmp_path, name="src"):
    dst = tmp_path / name
    shutil.copytree(FIXTURE, dst)
    return dst


def test_cache_hit_and_content_key(tmp_path, monkeypatch):
    src = _copy(tmp_path)
    cache = tmp_path / "cache"
    first = resolve_base_model(str(src), cache)
    assert first.parent == cache and (first / "model.safetensors.index.json").is_file()
    # Second call: no conversion at all.
    monkeypatch.setattr(cg, "convert_chatglm3", lambda *a, **k: pytest.fail("converted twice"))
    assert resolve_base_model(src, cache) == first
    # Same content elsewhere -> same key; changed weights -> new key.
    assert resolve_base_model(_copy(tmp_path, "other"), cache) == first
    monkeypatch.undo()
    sd = load_file(src / "model.safetensors")
    sd["transformer.encoder.final_layernorm.weight"] = sd["transformer.encoder.final_layernorm.weight"] * 2
    from safetensors.torch import save_file
    save_file(sd, str(src / "model.safetensors"))
    second = resolve_base_model(src, cache)
    assert second != first and second.parent == cache


def test_crash_leaves_nothing_half_written(tmp_path, monkeypatch):
    src = _copy(tmp_path)
    cache = tmp_path / "cache"

    def boom(*a, **k):
        raise OSError("disk full")
    monkeypatch.setattr("safetensors.torch.save_file", boom)
    with pytest.raises(OSError):
        resolve_base_model(src, cache)
    assert [p.name for p in cache.iterdir() if not p.name.startswith(".")] == []
    assert not list(cache.glob(".*.tmp-*"))
    monkeypatch.undo()
    assert (resolve_base_model(src, cache) / "config.json").is_file()


def test_bin_shards_and_shard_streaming(tmp_path, golden, golden_tol):
    """The real repository ships pytorch_model-0000k-of-00007.bin: convert from sharded .bin."""
    src = tmp_path / "bin-src"
    src.mkdir()
    for f in ("config.json", "tokenizer.model", "tokenizer_config.json"):
        shutil.copy(FIXTURE / f, src / f)
    sd = load_file(FIXTURE / "model.safetensors")
    keys = list(sd)
    parts = [keys[: len(keys) // 2], keys[len(keys) // 2:]]
    weight_map = {}
    for i, part in enumerate(parts, 1):
        name = f"pytorch_model-{i:05d}-of-00002.bin"
        torch.save({k: sd[k] for k in part}, src / name)
        weight_map.update({k: name for k in part})
    (src / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    seen = []
    out = cg.convert_chatglm3(src, tmp_path / "out", progress=lambda d, t: seen.append((d, t)))
    assert seen == [(1, 2), (2, 2)]
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) == 2
    model = load_model(out, quantize_4bit=False)
    ref = load_file(FIXTURE / "golden_logits.safetensors")
    case = golden["logits_cases"][0]
    with torch.no_grad():
        got = model(torch.tensor([case["input_ids"]])).logits[0]
    want = ref[case["key"]].reshape(got.shape)
    assert ((got - want).abs().max() / want.abs().max()).item() <= golden_tol


def test_config_mapping_rope_ratio_and_refusals():
    cfg = json.loads((FIXTURE / "config.json").read_text())
    g = cg.glm_config_dict(cfg)
    assert (g["head_dim"], g["num_key_value_heads"], g["intermediate_size"], g["vocab_size"]) == (16, 2, 96, 532)
    assert g["rope_parameters"] == {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5}
    assert g["attention_bias"] is True and g["tie_word_embeddings"] is False
    assert cg.glm_config_dict(dict(cfg, rope_ratio=50))["rope_parameters"]["rope_theta"] == 500000.0
    assert cg.glm_config_dict(dict(cfg, multi_query_attention=False))["num_key_value_heads"] == 4
    for bad in ({"rmsnorm": False}, {"add_bias_linear": True}, {"position_encoding_2d": True}):
        with pytest.raises(InvalidInput):
            cg.glm_config_dict(dict(cfg, **bad))


def test_demo_model_through_resolve_and_trains(tmp_path):
    src = build_demo_model(tmp_path / "demo")
    cfg = json.loads((src / "config.json").read_text())
    assert cfg["model_type"] == "chatglm"
    assert build_demo_model(tmp_path / "demo") == src  # idempotent
    resolved = resolve_base_model(src, tmp_path / "cache")
    tok = load_tokenizer(resolved)
    assert tok.convert_tokens_to_ids("[gMASK]") == 1001 and tok.convert_tokens_to_ids("<|observation|>") == 1008
    assert stop_token_ids(tok) == [2, 1006, 1008]
    assert 500 <= len(tok) <= 2100
    assert model_family(resolved) == "chatglm3" and model_family(src) == "chatglm3"

    from peft import LoraConfig, get_peft_model
    model = load_model(resolved, quantize_4bit=True, device="cpu")
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=DEFAULT_LORA_TARGETS["chatglm3"],
                                             task_type="CAUSAL_LM"))
    model.train()
    ids, labels = tokenize_chat(tok, [{"role": "user", "content": "类型#裙*材质#蕾丝"},
                                      {"role": "assistant", "content": "宫廷风的甜美蕾丝设计。"}], 256)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    batch = {"input_ids": torch.tensor([ids] * 4), "labels": torch.tensor([labels] * 4)}
    # "Small enough for a CPU demo" by size, not by a wall-clock bound read off one machine.
    assert sum(p.numel() for p in model.parameters()) < 5_000_000
    losses = []
    for _ in range(3):
        loss = model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


def test_other_model_types_pass_through(tmp_path):
    from transformers import LlamaConfig
    d = tmp_path / "llama"
    LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                vocab_size=100).save_pretrained(d)
    assert resolve_base_model(d, tmp_path / "cache") == d.resolve()
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").iterdir())
    assert model_family(d) == "llama"
    assert default_lora_targets("llama") == ["q_proj", "k_proj", "v_proj"]
    with pytest.raises(InvalidInput):
        resolve_base_model(str(tmp_path / "missing" / "dir"), tmp_path / "cache")


def test_unknown_family_targets_from_model():
    class Toy(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = torch.nn.Module()
            self.attn.query_key_value = torch.nn.Linear(4, 12)
            self.out = torch.nn.Linear(4, 4)
    assert default_lora_targets("toy", Toy()) == ["query_key_value"]
    assert default_lora_targets("toy") == ["q_proj", "k_proj", "v_proj"]


def test_hub_id_downloads_no_python_and_prefers_safetensors(tmp_path, monkeypatch):
    """Hub path without a hub: the snapshot never asks for *.py and skips .bin next to safetensors."""
    import huggingface_hub
    snap = _copy(tmp_path, "snapshot")
    calls = {}
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", lambda repo, name, **k: str(snap / name))
    monkeypatch.setattr(huggingface_hub, "list_repo_files", lambda repo, **k: [
        "config.json", "modeling_chatglm.py", "model-00001-of-00007.safetensors",
        "pytorch_model-00001-of-00007.bin", "tokenizer.model"])

    def snapshot_download(repo, **kw):
        calls.update(kw, repo=repo)
        return str(snap)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    out = resolve_base_model("THUDM/chatglm3-6b", tmp_path / "cache")
    assert calls["repo"] == "THUDM/chatglm3-6b" and (out / "config.json").is_file()
    assert "*.py" in calls["ignore_patterns"] and "*.bin" not in calls["allow_patterns"]
    assert not any(p.endswith(".py") for p in calls["allow_patterns"])

"""`tuneserve adapters list|export` (peft format: the registry's own files, no torch needed)."""
from __future__ import annotations

import json

from service.cli import app
from service.core.registry import AdapterRegistry


def _publish(settings, name="ft-ads-1"):
    src = settings.data_dir / "src"
    src.mkdir(parents=True, exist_ok=True)
    (src / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 8}))
    (src / "adapter_model.safetensors").write_bytes(b"not really tensors")
    return AdapterRegistry(settings.resolved_registry_dir).publish(
        tenant="default", name=name, source_dir=src,
        manifest={"base_model": "demo-base", "target_modules": ["query_key_value"], "r": 8, "lora_alpha": 32.0,
                  "metrics": {"bleu-4": 12.5}})


def test_adapters_list_and_export_over_http(api, invoke, tmp_path):
    _client, _store, _key, settings = api
    manifest = _publish(settings)
    res = invoke("adapters", "list")
    assert res.exit_code == 0, res.output
    assert "ft-ads-1" in res.output and "demo-base" in res.output

    out = tmp_path / "export"
    res = invoke("adapters", "export", "ft-ads-1", "--format", "peft", "--out", str(out))
    assert res.exit_code == 0, res.output
    assert sorted(p.name for p in out.iterdir()) == ["adapter_config.json", "adapter_model.safetensors",
                                                     "manifest.json"]
    assert (out / "adapter_model.safetensors").read_bytes() == b"not really tensors"
    assert json.loads((out / "manifest.json").read_text())["version"] == manifest.version

    res = invoke("adapters", "export", "ft-ads-1", "--format", "peft", "--out", str(out))
    assert res.exit_code == 1 and "not an empty directory" in res.output
    res = invoke("adapters", "export", "nope", "--format", "peft", "--out", str(tmp_path / "x"))
    assert res.exit_code == 1 and "404" in res.output
    res = invoke("adapters", "export", "ft-ads-1", "--format", "onnx", "--out", str(tmp_path / "y"))
    assert res.exit_code == 1 and "unknown --format" in res.output


def test_adapters_export_local_operator_mode(api, runner, tmp_path):
    _client, _store, _key, settings = api
    _publish(settings, "ft-local")
    out = tmp_path / "local"
    res = runner.invoke(app, ["adapters", "export", "ft-local", "--local", "--format", "peft", "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert (out / "adapter_config.json").is_file()
    res = runner.invoke(app, ["adapters", "export", "ft-local", "--local", "--tenant", "other", "--format", "peft",
                              "--out", str(tmp_path / "o")])
    assert res.exit_code == 1 and "not found" in res.output

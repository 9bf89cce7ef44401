"""`tuneserve convert-chatglm3` on the tiny ChatGLM3 fixture."""
from __future__ import annotations

import json
from pathlib import Path

from service.cli import app

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "chatglm3-tiny"


def test_convert_chatglm3_fixture(cli_env, runner, tmp_path):
    dst = tmp_path / "glm"
    res = runner.invoke(app, ["convert-chatglm3", str(FIXTURE), str(dst)])
    assert res.exit_code == 0, res.output
    assert "converted" in res.output and "1/1" in res.output  # the progress bar reached its end
    config = json.loads((dst / "config.json").read_text())
    assert config["model_type"] == "glm" and config["architectures"] == ["GlmForCausalLM"]
    assert list(dst.glob("*.safetensors")) and (dst / "tokenizer.json").is_file()

    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(dst)  # loads natively, no remote code
    assert type(model).__name__ == "GlmForCausalLM"


def test_convert_chatglm3_refuses_existing_dst_and_non_chatglm_src(cli_env, runner, tmp_path):
    dst = tmp_path / "exists"
    dst.mkdir()
    res = runner.invoke(app, ["convert-chatglm3", str(FIXTURE), str(dst)])
    assert res.exit_code == 1 and "already exists" in res.output

    not_glm = tmp_path / "other"
    not_glm.mkdir()
    (not_glm / "config.json").write_text(json.dumps({"model_type": "llama"}))
    res = runner.invoke(app, ["convert-chatglm3", str(not_glm), str(tmp_path / "out")])
    assert res.exit_code == 1 and "chatglm" in res.output
    assert not (tmp_path / "out").exists()

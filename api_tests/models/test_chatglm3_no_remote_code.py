"""Loading a ChatGLM3 checkpoint never imports or runs a .py file from its directory."""
from __future__ import annotations

import shutil
import sys

import pytest
import torch
from chatglm3_helpers import FIXTURE

from service.core.errors import InvalidInput
from service.models import load_model, load_tokenizer, render_chat, resolve_base_model

TRAPS = ("modeling_chatglm", "tokenization_chatglm", "configuration_chatglm")


@pytest.fixture()
def trapped(tmp_path):
    src = tmp_path / "chatglm3-trapped"
    shutil.copytree(FIXTURE, src)
    marker = tmp_path / "EXECUTED"
    for name in TRAPS:
        (src / f"{name}.py").write_text(
            f"open({str(marker)!r}, 'a').write({name!r} + '\\n')\n"
            f"raise RuntimeError('remote code from the checkpoint dir was executed: {name}')\n")
    return src, marker


def test_resolve_and_load_never_execute_checkpoint_code(trapped, tmp_path, golden):
    src, marker = trapped
    resolved = resolve_base_model(str(src), tmp_path / "cache")
    assert not list(resolved.glob("*.py"))  # nothing executable travels into the converted dir
    tok = load_tokenizer(resolved)
    model = load_model(resolved, quantize_4bit=False, device="cpu")
    ids = render_chat(tok, [{"role": "user", "content": "类型#裙"}])
    with torch.no_grad():
        model(torch.tensor([ids]))
    load_model(resolved, quantize_4bit=True, device="cpu")
    assert not marker.exists(), marker.read_text()
    assert not [m for m in sys.modules if m.split(".")[-1] in TRAPS]


def test_raw_chatglm_dir_is_refused_not_executed(trapped):
    src, marker = trapped
    with pytest.raises(InvalidInput):
        load_model(src, quantize_4bit=False, trust_remote_code=True)
    with pytest.raises(InvalidInput):
        load_tokenizer(src)
    assert not marker.exists()

"""Shared fixtures for the ChatGLM3 tests: the golden fixture and one conversion of it."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from chatglm3_helpers import FIXTURE


@pytest.fixture(scope="session")
def fixture_dir() -> Path:
    return FIXTURE


@pytest.fixture(scope="session")
def golden() -> dict:
    return json.loads((FIXTURE / "golden.json").read_text())


@pytest.fixture(scope="session")
def converted(tmp_path_factory) -> Path:
    from service.models import convert_chatglm3
    return convert_chatglm3(FIXTURE, tmp_path_factory.mktemp("conv") / "chatglm3-tiny-glm")


@pytest.fixture(scope="session")
def tokenizer(converted):
    from service.models import load_tokenizer
    return load_tokenizer(converted)


@pytest.fixture(scope="session")
def model_fp32(converted):
    from service.models import load_model
    torch.manual_seed(0)
    return load_model(converted, quantize_4bit=False, device="cpu", compute_dtype=torch.float32)


# Golden logits were computed in float32 on some machine; float32 kernels round differently
# per CPU. The tolerance is this many times the rounding noise measured here.
NOISE_FACTOR = 8


@pytest.fixture(scope="session")
def golden_tol(model_fp32, golden, fixture_dir) -> float:
    """Relative tolerance (of max|logit|) for comparisons with the golden logits: NOISE_FACTOR
    times this CPU's float32 rounding noise on the golden cases, i.e. the converted model in
    float32 against the same model in float64 (floor: one float32 rounding step). Also checks
    that the float64 model is that close to the golden logits: the conversion computes what
    the original computed, up to float32 rounding."""
    import copy

    from safetensors.torch import load_file

    ref = load_file(fixture_dir / "golden_logits.safetensors")
    model64 = copy.deepcopy(model_fp32).double()
    noise, vs_golden = 0.0, 0.0
    with torch.no_grad():
        for case in golden["logits_cases"]:
            ids = torch.tensor([case["input_ids"]])
            exact = model64(ids).logits[0]
            want = ref[case["key"]].double().reshape(exact.shape)
            scale = want.abs().max()
            noise = max(noise, float((model_fp32(ids).logits[0].double() - exact).abs().max() / scale))
            vs_golden = max(vs_golden, float((want - exact).abs().max() / scale))
    tol = NOISE_FACTOR * max(noise, torch.finfo(torch.float32).eps)
    print(f"golden logits: float32 rounding noise {noise:.3g} (tolerance {tol:.3g}); "
          f"float64 model vs golden {vs_golden:.3g}")
    assert vs_golden <= tol, (vs_golden, tol)
    return tol

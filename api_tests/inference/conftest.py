from __future__ import annotations

import pytest

from inference_helpers import FIXTURE


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory):
    """The ChatGLM3 fixture converted to native GLM (as the engine loads it)."""
    from service.models import resolve_base_model

    return resolve_base_model(str(FIXTURE), tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="session")
def base_fp32(tiny_base):
    from service.models import load_model

    return load_model(tiny_base, quantize_4bit=False, device="cpu")


@pytest.fixture(scope="session")
def tokenizer(tiny_base):
    from service.models import load_tokenizer

    return load_tokenizer(tiny_base)

"""Shared fixtures for the ChatGLM3 tests: the golden fixture and one conversion of it."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "chatglm3-tiny"


def chat_messages(case: dict) -> list[dict]:
    """golden chat_input / greedy_chat case -> messages (history + the query in its role)."""
    return list(case["history"]) + [{"role": case["role"], "content": case["query"]}]


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

"""Fixtures for the training-core tests: the tiny ChatGLM3 fixture, converted once per session
through service.models exactly as a real job resolves its base model."""
from __future__ import annotations

from pathlib import Path

import pytest

from train_helpers import FIXTURE


@pytest.fixture(scope="session")
def models_cache(tmp_path_factory) -> Path:
    """Conversion cache shared by the session (resolve_base_model converts the fixture once)."""
    from service.models import resolve_base_model

    cache = tmp_path_factory.mktemp("models")
    resolve_base_model(FIXTURE, cache)
    return cache


@pytest.fixture(scope="session")
def converted(models_cache) -> Path:
    from service.models import resolve_base_model

    return Path(resolve_base_model(FIXTURE, models_cache))


@pytest.fixture(scope="session")
def tokenizer(converted):
    from service.models import load_tokenizer

    return load_tokenizer(converted)



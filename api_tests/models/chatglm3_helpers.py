"""Helpers the ChatGLM3 tests import (a module of its own: `from conftest import ...` would
get whichever folder's conftest.py was imported last when several folders are collected)."""
from __future__ import annotations

from pathlib import Path

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "chatglm3-tiny"


def chat_messages(case: dict) -> list[dict]:
    """golden chat_input / greedy_chat case -> messages (history + the query in its role)."""
    return list(case["history"]) + [{"role": case["role"], "content": case["query"]}]

"""`tuneserve chat`: one message and the REPL, streamed and not, against the real engine on the
tiny ChatGLM3 fixture (in-process app through TestClient)."""
from __future__ import annotations

import uuid
from pathlib import Path

import pytest
from typer.testing import CliRunner

from service.cli import app

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "chatglm3-tiny"


pytestmark = pytest.mark.slow  # starts the real engine once for the module


@pytest.fixture(scope="module")
def chat_api(tmp_path_factory):
    from fastapi.testclient import TestClient

    from service.api.app import create_app
    from service.core.config import Settings
    from service.core.store import Store

    settings = Settings(data_dir=tmp_path_factory.mktemp("chat"), base_model=str(FIXTURE), device="cpu",
                        task_queue=f"cli-chat-{uuid.uuid4().hex[:8]}")
    store = Store(settings.resolved_database_url)
    key, _ = store.create_api_key("default")
    store.close()
    with TestClient(create_app(settings)) as client:
        yield client, key


def test_chat_one_message_streamed_and_not(chat_api):
    client, key = chat_api
    runner = CliRunner()
    args = ["chat", "-m", "你好", "--temperature", "0", "--max-tokens", "6"]
    streamed = runner.invoke(app, args, obj={"http": client}, env={"TUNESERVE_API_KEY": key})
    assert streamed.exit_code == 0, streamed.output
    whole = runner.invoke(app, [*args, "--no-stream"], obj={"http": client}, env={"TUNESERVE_API_KEY": key})
    assert whole.exit_code == 0, whole.output
    assert streamed.output.strip() and streamed.output.strip() == whole.output.strip()  # greedy: same text


def test_chat_repl_keeps_history_and_quits(chat_api):
    client, key = chat_api
    res = CliRunner().invoke(app, ["chat", "--temperature", "0", "--max-tokens", "4"], obj={"http": client},
                             env={"TUNESERVE_API_KEY": key}, input="你好\n/reset\n再见\n/exit\n")
    assert res.exit_code == 0, res.output
    assert res.output.count("bot>") == 2 and "history cleared" in res.output


def test_chat_unknown_adapter_is_a_clean_error(chat_api):
    client, key = chat_api
    res = CliRunner().invoke(app, ["chat", "--adapter", "ft-nope", "-m", "hi"], obj={"http": client},
                             env={"TUNESERVE_API_KEY": key})
    assert res.exit_code == 1 and "404" in res.output and "Traceback" not in res.output

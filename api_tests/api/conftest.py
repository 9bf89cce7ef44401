"""API tests: the real app (create_app) through Starlette's TestClient, a SQLite file in a tmp
dir, the machine's real Redis with a dedicated queue name per test (so "nothing enqueued" is
checked on the broker itself), and the engine disabled unless a test asks for the tiny model."""
from __future__ import annotations

import json
import uuid
from pathlib import Path

import pytest
import redis
from fastapi.testclient import TestClient

from service.api.app import create_app
from service.core.config import Settings

REDIS_URL = "redis://127.0.0.1:6379/0"
KEY_A, KEY_B = "test-key-alice-0123456789", "test-key-bob-0123456789"
AUTH_A = {"Authorization": f"Bearer {KEY_A}"}
AUTH_B = {"Authorization": f"Bearer {KEY_B}"}
BASE = "tuneserve-demo-chatglm3-tiny"


def _redis_up() -> bool:
    try:
        return bool(redis.Redis.from_url(REDIS_URL, socket_connect_timeout=1).ping())
    except Exception:
        return False


@pytest.fixture(scope="session")
def redis_client():
    if not _redis_up():
        pytest.skip("Redis at 127.0.0.1:6379 is required for API tests")
    client = redis.Redis.from_url(REDIS_URL)
    yield client
    client.close()


@pytest.fixture
def queue_name(redis_client):
    name = f"tuneserve-apitest-{uuid.uuid4().hex[:12]}"
    yield name
    redis_client.delete(name)


@pytest.fixture
def make_settings(tmp_path, queue_name):
    def make(**overrides) -> Settings:
        values = dict(data_dir=tmp_path / "data", redis_url=REDIS_URL, task_queue=queue_name,
                      api_keys=f"{KEY_A}:alice,{KEY_B}:bob", engine_enabled=False,
                      max_upload_bytes=64 * 1024, max_line_bytes=8 * 1024, max_json_depth=8,
                      max_upload_rows=1000)
        values.update(overrides)
        return Settings(**values)
    return make


@pytest.fixture
def settings(make_settings):
    return make_settings()


@pytest.fixture
def client(settings):
    with TestClient(create_app(settings)) as c:
        yield c


@pytest.fixture
def queue_len(redis_client, queue_name):
    return lambda: int(redis_client.llen(queue_name))


def jsonl(rows) -> bytes:
    return b"".join(json.dumps(r, ensure_ascii=False).encode() + b"\n" for r in rows)


GOOD_ROWS = [{"content": f"类型#裙*颜色#红色*{i}", "summary": f"一条红色的裙子 {i}"} for i in range(5)]


def upload(c: TestClient, data: bytes, *, headers=AUTH_A, filename="train.jsonl", purpose="fine-tune"):
    form = {"purpose": purpose} if purpose is not None else {}
    return c.post("/v1/files", headers=headers, files={"file": (filename, data, "application/jsonl")}, data=form)


def upload_ok(c: TestClient, rows=GOOD_ROWS, headers=AUTH_A) -> str:
    r = upload(c, jsonl(rows), headers=headers)
    assert r.status_code == 200, r.text
    return r.json()["id"]


def files_on_disk(settings: Settings) -> list[Path]:
    d = settings.files_dir
    return sorted(d.iterdir()) if d.exists() else []


def assert_error(r, status: int, *, param: str | None = ..., code: str | None = ...) -> dict:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"}, body
    err = body["error"]
    assert {"message", "type", "param", "code"} <= set(err), err
    assert isinstance(err["message"], str) and err["message"]
    if param is not ...:
        assert err["param"] == param, err
    if code is not ...:
        assert err["code"] == code, err
    return err

"""CLI tests: typer's CliRunner; client commands go to the real app through an injected
FastAPI TestClient (obj={"http": client}), operator commands to a tmp SQLite store."""
from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner


@pytest.fixture
def cli_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A private data dir (SQLite store, registry, saved key) and no inherited client settings."""
    data = tmp_path / "data"
    monkeypatch.setenv("TUNESERVE_DATA_DIR", str(data))
    for var in ("TUNESERVE_URL", "TUNESERVE_API_KEY", "TUNESERVE_DATABASE_URL", "TUNESERVE_BASE_MODEL",
                "TUNESERVE_REGISTRY_DIR", "TUNESERVE_API_KEYS", "TUNESERVE_HOST", "TUNESERVE_PORT"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("COLUMNS", "200")
    return data


@pytest.fixture
def runner() -> CliRunner:
    return CliRunner()


@pytest.fixture
def api(cli_env: Path):
    """(TestClient, Store, api key) for the real app with the engine off; jobs it enqueues go to a
    private queue name on the real Redis (nobody consumes it; removed afterwards)."""
    from fastapi.testclient import TestClient

    from service.api.app import create_app
    from service.core.config import Settings
    from service.core.store import Store

    queue = f"cli-test-{uuid.uuid4().hex[:8]}"
    settings = Settings(data_dir=cli_env, engine_enabled=False, task_queue=queue, base_model="demo-base")
    store = Store(settings.resolved_database_url)
    key, _ = store.create_api_key("default", name="cli-test")
    with TestClient(create_app(settings)) as client:
        yield client, store, key, settings
    store.close()
    try:
        import redis
        r = redis.Redis.from_url(settings.redis_url)
        r.delete(queue)
        r.close()
    except Exception:
        pass


@pytest.fixture
def invoke(runner: CliRunner, api) -> Iterator:
    """Run a CLI command against the test app, authenticated through TUNESERVE_API_KEY."""
    from service.cli import app

    client, _store, key, _settings = api

    def run(*args: str):
        return runner.invoke(app, list(args), obj={"http": client}, env={"TUNESERVE_API_KEY": key})
    yield run

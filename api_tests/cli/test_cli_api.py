"""`tuneserve api`: what it hands uvicorn (no server is started)."""
from __future__ import annotations

import httpx
import pytest

from service.cli import app


@pytest.fixture
def uvicorn_kwargs(monkeypatch):
    """The keyword arguments `tuneserve api` passes to uvicorn.run (the app itself not built)."""
    import uvicorn

    import service.api.app
    import service.logging
    seen: dict = {}
    monkeypatch.setattr(service.api.app, "create_app", lambda settings: object())
    monkeypatch.setattr(service.logging, "configure_logging", lambda *a, **k: None)
    monkeypatch.setattr(uvicorn, "run", lambda app_, **kw: seen.update(kw))
    return seen


def test_keep_alive_outlasts_the_clients_pool_expiry(cli_env, runner, uvicorn_kwargs, monkeypatch):
    """A server that closes an idle connection no later than the client's pool does races the
    client's next request on it (under load: a reset, httpx ReadError). The client must always
    drop an idle connection first: httpx's and the OpenAI SDK's pools keep one 5 s."""
    from openai._constants import DEFAULT_CONNECTION_LIMITS

    res = runner.invoke(app, ["api", "--port", "8999"])
    assert res.exit_code == 0, res.output
    httpx_expiry = httpx.Limits().keepalive_expiry
    client_expiry = max(httpx_expiry, DEFAULT_CONNECTION_LIMITS.keepalive_expiry or httpx_expiry)
    assert uvicorn_kwargs["timeout_keep_alive"] > client_expiry
    monkeypatch.setenv("TUNESERVE_KEEP_ALIVE_S", "30")  # the setting is the operator's
    uvicorn_kwargs.clear()
    assert runner.invoke(app, ["api", "--port", "8999"]).exit_code == 0
    assert uvicorn_kwargs["timeout_keep_alive"] == 30

"""`tuneserve keys create|list|revoke` against a tmp SQLite store (operator commands, no server)."""
from __future__ import annotations

from service.cli import app
from service.core.config import Settings
from service.core.store import Store


def _store() -> Store:
    return Store(Settings().resolved_database_url)


def test_keys_create_list_revoke(cli_env, runner):
    res = runner.invoke(app, ["keys", "create", "--tenant", "acme", "--name", "ci"])
    assert res.exit_code == 0, res.output
    key = res.output.strip().splitlines()[-1]
    assert key.startswith("ts-") and len(key) > 30

    store = _store()
    try:
        assert store.tenant_for_key(key) == "acme"  # stored (hashed), usable
        [info] = store.list_api_keys("acme")
    finally:
        store.close()
    assert info.name == "ci"

    res = runner.invoke(app, ["keys", "list"])
    assert res.exit_code == 0, res.output
    assert info.id in res.output and "acme" in res.output
    assert key not in res.output  # only the prefix is ever shown again

    res = runner.invoke(app, ["keys", "revoke", info.id])
    assert res.exit_code == 0, res.output
    assert "revoked" in res.output
    store = _store()
    try:
        assert store.tenant_for_key(key) is None
        assert store.list_api_keys("acme")[0].revoked_at is not None
    finally:
        store.close()

    res = runner.invoke(app, ["keys", "list", "--tenant", "acme"])
    assert res.exit_code == 0 and info.id in res.output


def test_keys_list_filters_by_tenant(cli_env, runner):
    for tenant in ("t1", "t2"):
        assert runner.invoke(app, ["keys", "create", "--tenant", tenant]).exit_code == 0
    res = runner.invoke(app, ["keys", "list", "--tenant", "t2"])
    assert res.exit_code == 0
    assert " t2 " in res.output and " t1 " not in res.output


def test_keys_revoke_unknown_is_an_error(cli_env, runner):
    res = runner.invoke(app, ["keys", "revoke", "key-doesnotexist"])
    assert res.exit_code == 1
    assert "not found" in res.output


def test_keys_create_refuses_bad_tenant(cli_env, runner):
    for bad in ("../etc", "Upper", "a/b", ""):
        res = runner.invoke(app, ["keys", "create", "--tenant", bad])
        assert res.exit_code != 0, bad
    store = _store()
    try:
        assert store.list_api_keys() == []  # nothing written
    finally:
        store.close()


def test_server_commands_refuse_a_public_bind_without_keys(cli_env, runner):
    res = runner.invoke(app, ["api", "--host", "0.0.0.0", "--port", "8999"])
    assert res.exit_code == 1
    assert "TUNESERVE_API_KEYS" in res.output and "Traceback" not in res.output

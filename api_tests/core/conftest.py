"""Fixtures for the core tests: a `store` on SQLite and on PostgreSQL.

PostgreSQL: one fresh database `tuneserve_test_<hex>` per test session (dropped at the end)
and one schema per test inside it, so parallel runs and tests never see each other's rows.
Without a reachable server the PostgreSQL variants skip, unless TUNESERVE_REQUIRE_PG=1 (CI).
"""
from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from urllib.parse import quote

import pytest

from service.core.store import Store

PG_ADMIN_URL = os.environ.get("TUNESERVE_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")


def _libpq(url: str) -> str:
    return url.replace("postgresql+psycopg://", "postgresql://", 1)


def _admin_connect(url: str):
    import psycopg

    return psycopg.connect(_libpq(url), autocommit=True, connect_timeout=3)


@pytest.fixture(scope="session")
def pg_url() -> Iterator[str]:
    """URL of a fresh, empty PostgreSQL database for this test session."""
    import psycopg

    try:
        admin = _admin_connect(PG_ADMIN_URL)
    except psycopg.OperationalError as exc:
        if os.environ.get("TUNESERVE_REQUIRE_PG"):
            pytest.fail(f"PostgreSQL required but unreachable at {PG_ADMIN_URL}: {exc}")
        pytest.skip(f"PostgreSQL unreachable at {PG_ADMIN_URL}")
    name = f"tuneserve_test_{secrets.token_hex(6)}"
    with admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    base, _, _ = PG_ADMIN_URL.rpartition("/")
    try:
        yield f"{base}/{name}"
    finally:
        with _admin_connect(PG_ADMIN_URL) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def pg_schema_url(pg_url: str) -> Iterator[str]:
    """A URL whose search_path is a fresh schema of the session database (dropped after)."""
    schema = f"t_{secrets.token_hex(6)}"
    with _admin_connect(pg_url) as conn:
        conn.execute(f'CREATE SCHEMA "{schema}"')
    try:
        yield f"{pg_url}?options={quote(f'-csearch_path={schema}')}"
    finally:
        with _admin_connect(pg_url) as conn:
            conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request, tmp_path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'tuneserve.db'}"
    return request.getfixturevalue("pg_schema_url")


@pytest.fixture
def store(db_url: str) -> Iterator[Store]:
    st = Store(db_url)
    try:
        yield st
    finally:
        st.close()

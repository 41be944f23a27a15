"""Fixtures shared by every test: real mosquitto, real databases, real mqttd processes."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
from lab.broker import Broker
from lab.daemon import Host
from lab.db import TenantDB, pg_available
from lab.supervisor import site, supervisord  # noqa: F401 - fixtures for the deployment tests

_PG = None


def _pg_ok() -> bool:
    global _PG
    if _PG is None:
        _PG = pg_available()
    return _PG


@pytest.fixture
def broker(tmp_path: Path):
    b = Broker(tmp_path / "broker").start()
    yield b
    b.stop() if b.proc else None


@pytest.fixture
def host(tmp_path: Path):
    h = Host(tmp_path / "host")
    yield h
    h.reap()


@pytest.fixture
def sqlite_db(tmp_path: Path) -> TenantDB:
    db = TenantDB.sqlite(tmp_path / "tenant.sqlite3")
    db.migrate()
    return db


@pytest.fixture
def pg_db():
    if not _pg_ok():
        if os.environ.get("CI"):
            pytest.fail("PostgreSQL on 127.0.0.1:5432 is required in CI")
        pytest.skip("PostgreSQL on 127.0.0.1:5432 not reachable")
    db = TenantDB.postgres()
    db.migrate()
    yield db
    db.drop()


@pytest.fixture(params=["sqlite", "postgres"])
def tenant_db(request, tmp_path: Path):
    """The same test on SQLite and on PostgreSQL."""
    if request.param == "sqlite":
        return request.getfixturevalue("sqlite_db")
    return request.getfixturevalue("pg_db")

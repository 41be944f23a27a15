"""Tenant databases for tests: a fresh SQLite file, or a uniquely named PostgreSQL database on the
machine's server (127.0.0.1:5432, user postgres) that is dropped afterwards."""
from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import uuid
from pathlib import Path

TENANT_DIR = Path(__file__).resolve().parents[2] / "tests" / "tenant"
PG = {"host": os.environ.get("TENANT_DB_HOST", "127.0.0.1"), "port": int(os.environ.get("TENANT_DB_PORT", "5432")),
      "user": os.environ.get("TENANT_DB_USER", "postgres")}


def pg_available() -> bool:
    try:
        import psycopg

        with psycopg.connect(dbname="postgres", connect_timeout=3, **PG):
            return True
    except Exception:  # noqa: BLE001
        return False


class TenantDB:
    def __init__(self, engine: str, name: str) -> None:
        self.engine, self.name = engine, name

    @property
    def env(self) -> dict[str, str]:
        return {"TENANT_DB_ENGINE": self.engine, "TENANT_DB_NAME": self.name}

    @classmethod
    def sqlite(cls, path: Path) -> TenantDB:
        return cls("sqlite", str(path))

    @classmethod
    def postgres(cls) -> TenantDB:
        import psycopg

        name = f"mqttd_test_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(dbname="postgres", autocommit=True, **PG) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return cls("postgres", name)

    def migrate(self, tenant_dir: Path = TENANT_DIR, env: dict[str, str] | None = None) -> None:
        """``tenant_dir``: whose sample tenant (and so whose migrations) to apply, ``env``: more of
        the environment (PYTHONPATH: whose mqttd); scripts/bench --baseline migrates an older
        commit's databases with that commit's tenant and code."""
        full = {**os.environ, **self.env, **(env or {})}
        subprocess.run([sys.executable, "manage.py", "migrate", "-v0"], cwd=tenant_dir, env=full, check=True)

    def query(self, sql: str, params: tuple = ()) -> list[tuple]:
        if self.engine == "sqlite":
            conn = sqlite3.connect(self.name, timeout=30)
            try:
                return conn.execute(sql, params).fetchall()
            finally:
                conn.close()
        import psycopg

        with psycopg.connect(dbname=self.name, **PG) as conn:
            return conn.execute(sql.replace("?", "%s"), params).fetchall()

    def scalar(self, sql: str, params: tuple = ()):
        return self.query(sql, params)[0][0]

    def terminate_backends(self) -> int:
        """pg_terminate_backend on every other connection to this database."""
        import psycopg

        with psycopg.connect(dbname="postgres", autocommit=True, **PG) as conn:
            rows = conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                                "WHERE datname = %s AND pid <> pg_backend_pid()", (self.name,)).fetchall()
        return len(rows)

    def drop(self) -> None:
        if self.engine == "postgres":
            import psycopg

            with psycopg.connect(dbname="postgres", autocommit=True, **PG) as conn:
                conn.execute(f'DROP DATABASE IF EXISTS "{self.name}" WITH (FORCE)')

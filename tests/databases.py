"""Throwaway databases for tests: an SQLite file, or a fresh database on the
PostgreSQL server at SDMESH_TEST_POSTGRES (default 127.0.0.1:5432, user
postgres). PostgreSQL tests skip with a message when the server is
unreachable, unless SDMESH_REQUIRE_POSTGRES=1 (CI) makes that a failure."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import sqlalchemy as sa

POSTGRES_ADMIN_URL = os.environ.get(
    "SDMESH_TEST_POSTGRES", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)
_unreachable: str | None = None
_checked = False


def _postgres_problem() -> str | None:
    global _checked, _unreachable
    if not _checked:
        _checked = True
        engine = sa.create_engine(POSTGRES_ADMIN_URL, connect_args={"connect_timeout": 3})
        try:
            with engine.connect() as conn:
                conn.execute(sa.text("SELECT 1"))
        except sa.exc.OperationalError as exc:
            _unreachable = str(exc.orig).strip().splitlines()[0]
        finally:
            engine.dispose()
    return _unreachable


def require_postgres() -> None:
    problem = _postgres_problem()
    if problem is None:
        return
    message = f"PostgreSQL unreachable at {POSTGRES_ADMIN_URL}: {problem}"
    if os.environ.get("SDMESH_REQUIRE_POSTGRES") == "1":
        pytest.fail(message + " (SDMESH_REQUIRE_POSTGRES=1)")
    pytest.skip(message + "; start PostgreSQL or set SDMESH_TEST_POSTGRES to run these tests")


@contextmanager
def postgres_database() -> Iterator[str]:
    """Creates a database for one test and drops it afterwards."""
    require_postgres()
    name = f"sdmesh_test_{uuid.uuid4().hex[:12]}"
    admin = sa.create_engine(POSTGRES_ADMIN_URL, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
        yield (
            sa.make_url(POSTGRES_ADMIN_URL).set(database=name).render_as_string(hide_password=False)
        )
    finally:
        with admin.connect() as conn:
            conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@contextmanager
def database(kind: str, tmp_path: Path) -> Iterator[str]:
    if kind == "sqlite":
        yield f"sqlite:///{tmp_path / 'sdmesh.db'}"
    else:
        with postgres_database() as url:
            yield url

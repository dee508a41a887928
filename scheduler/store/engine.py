"""Creates the SQLAlchemy engine for an SQLite file or a PostgreSQL URL, and
brings its schema to a revision with Alembic. There is no create_all."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from sqlalchemy import event

MIGRATIONS = Path(__file__).resolve().parent / "migrations"
MIGRATION_LOCK = 0x5D3E5  # a PostgreSQL advisory lock key for schema changes


def create_engine(url: str) -> sa.Engine:
    if url.startswith("sqlite"):
        return _sqlite_engine(url)
    if url.startswith("postgresql"):
        # Nothing the scheduler does may wait on the database for long: a
        # leader stuck on a lock cannot renew its lease, and would rather fail
        # and retry (or step down) than hang.
        options = "-c lock_timeout=5000 -c statement_timeout=15000"
        return sa.create_engine(
            url,
            pool_pre_ping=True,
            pool_size=8,
            max_overflow=4,
            connect_args={"options": options, "connect_timeout": 10},
        )
    raise ValueError(
        f"unsupported database URL {url!r}: use sqlite:///PATH or postgresql+psycopg://"
    )


def _sqlite_engine(url: str) -> sa.Engine:
    engine = sa.create_engine(url, connect_args={"timeout": 30, "check_same_thread": False})

    @event.listens_for(engine, "connect")
    def on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Let SQLAlchemy, not the sqlite3 module, decide where transactions
        # begin, so a read and the write after it share one transaction.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.close()

    # ... and begin each with BEGIN: the dialect's own hook, not a "begin"
    # event, because any connection event listener has SQLAlchemy dispatch
    # events around every statement, which costs more CPU than the BEGIN.
    engine.dialect.do_begin = _begin  # type: ignore[method-assign]
    return engine


def _begin(dbapi_connection: Any) -> None:
    dbapi_connection.execute("BEGIN")


def _alembic(engine: sa.Engine, action: Callable[[Config, str], None], revision: str) -> None:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    with engine.begin() as connection:
        if connection.dialect.name == "postgresql":
            # Replicas starting together must not both create the schema:
            # the second waits here, then finds it up to date.
            connection.exec_driver_sql(f"SELECT pg_advisory_xact_lock({MIGRATION_LOCK})")
        config.attributes["connection"] = connection
        action(config, revision)


def migrate(engine: sa.Engine, revision: str = "head") -> None:
    """Brings the schema up to `revision`."""
    _alembic(engine, command.upgrade, revision)


def downgrade(engine: sa.Engine, revision: str) -> None:
    _alembic(engine, command.downgrade, revision)

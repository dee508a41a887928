"""Creates the SQLAlchemy engine for an SQLite file or a PostgreSQL URL, and
brings its schema to a revision with Alembic. There is no create_all.

A database that cannot be opened or reached when the schema is brought up
to date raises `DatabaseUnreachable`, whose message is one line saying why
and what to do: the first thing `sdctl scheduler` and `sdctl admin` do."""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from sqlalchemy import event

from scheduler.config import parse_database_url

MIGRATIONS = Path(__file__).resolve().parent / "migrations"
MIGRATION_LOCK = 0x5D3E5  # a PostgreSQL advisory lock key for schema changes


class DatabaseUnreachable(Exception):
    """The database cannot be opened or reached; the message says why and
    what to do, in one line, without the URL's password."""


def create_engine(url: str) -> sa.Engine:
    url = parse_database_url(url)
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
    """Brings the schema up to `revision`. Raises DatabaseUnreachable when
    the database cannot be opened or reached."""
    try:
        _alembic(engine, command.upgrade, revision)
    except (sa.exc.OperationalError, sa.exc.InterfaceError) as exc:
        raise DatabaseUnreachable(describe_failure(engine.url, exc)) from None


def downgrade(engine: sa.Engine, revision: str) -> None:
    _alembic(engine, command.downgrade, revision)


# What the drivers say, and what it means to the person who typed --db.
_NO_DATABASE = re.compile(r'database "([^"]+)" does not exist')
_NO_ROLE = re.compile(r'role "([^"]+)" does not exist')


def describe_failure(url: sa.URL, error: Exception) -> str:
    """Why the database at `url` could not be used, in one line that says
    what to do about it."""
    detail = str(getattr(error, "orig", None) or error)
    if url.get_backend_name() == "sqlite":
        return _describe_sqlite(Path(url.database or ""), detail)
    host, port = url.host or "localhost", url.port or 5432
    where = f"PostgreSQL at {host}:{port}"
    if found := _NO_DATABASE.search(detail):
        name = found.group(1)
        return (
            f"{where} has no database {name!r}: create it "
            f"(createdb -h {host} -p {port} -U {url.username or 'postgres'} {name}) or fix --db"
        )
    if found := _NO_ROLE.search(detail):
        return f"{where} has no user {found.group(1)!r}: fix --db, or create the user"
    if "password authentication failed" in detail or "no password supplied" in detail:
        return f"{where} refused user {url.username!r}: wrong or missing password in --db"
    if "Connection refused" in detail:
        return f"{where} refused the connection: is PostgreSQL running there? check --db"
    if "translate host name" in detail or "Name or service not known" in detail:
        return f"PostgreSQL host {host!r} does not resolve: check the host name in --db"
    if "timeout expired" in detail:
        return f"{where} did not answer in time: check the host and port in --db"
    return (
        f"cannot use the database {url.render_as_string(hide_password=True)}: {_first_line(detail)}"
    )


def _describe_sqlite(path: Path, detail: str) -> str:
    folder = path.parent
    if "unable to open database file" in detail:
        if not folder.is_dir():
            return f"cannot open the SQLite database {path}: the folder {folder} does not exist"
        if not os.access(folder, os.W_OK):
            return f"cannot open the SQLite database {path}: {folder} is not writable by this user"
    if "readonly database" in detail:
        return f"cannot write the SQLite database {path}: it is read-only for this user"
    return f"cannot use the SQLite database {path}: {_first_line(detail)}"


def _first_line(detail: str) -> str:
    """A driver's message is often several lines; the first says what."""
    return next((line.strip() for line in detail.splitlines() if line.strip()), detail)

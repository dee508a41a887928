"""Alembic environment. The store runs migrations on a connection it opened
and passes in `config.attributes["connection"]`; `alembic` on the command
line uses sqlalchemy.url instead."""

from __future__ import annotations

import sqlalchemy as sa
from alembic import context

from scheduler.store.schema import metadata

config = context.config


def run(connection: sa.Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=metadata,
        # SQLite cannot ALTER most things; batch mode rebuilds the table.
        render_as_batch=connection.dialect.name == "sqlite",
    )
    with context.begin_transaction():
        context.run_migrations()


connection = config.attributes.get("connection")
if connection is not None:
    run(connection)
else:
    engine = sa.create_engine(config.get_main_option("sqlalchemy.url") or "")
    with engine.connect() as conn:
        run(conn)
